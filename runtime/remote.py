"""Measure candidate kernels on the device they are tuned for.

A :class:`Measurer` times one compiled candidate (``time``) or a batch of them
(``time_many``, in parallel across the boards of a tracker key). The tuner builds
candidates and decides what to keep; a measurer only builds them for its target,
checks them once against NumPy on the device and times them there::

    m = RemoteMeasurer.connect("tracker://127.0.0.1:9190/rpi4", "rpi4")   # or LocalMeasurer("llvm")
    seconds = m.time(prim_func, [x, data, indices, indptr, bias, y], check=lambda out: ...)
    results = m.time_many([Job(f, args, check) for f in candidates], progress=print)
    m.device    # what records carry: {"remote", "key", "emulated", "info": [...]}
    m.close()

Remotes (``RemoteMeasurer.connect``):

``ssh://[user@]board[:port][/path/to/tuning-server]``
    starts ``tuning-server --stdio`` on the board over ``ssh -T`` (``$BSCOMPILE_SSH``
    overrides the ssh command); the default path is the one ``bscompile package
    --tuning-server`` bundles unpack to: ``bscompile-tuning-server/tuning-server``.
``tcp://host:port``
    a server started with ``tuning-server --port P`` (e.g. behind ``ssh -L``).
``tracker://host:port/KEY``
    TVM's RPC tracker (``python -m tvm.exec.rpc_tracker``); every board registered
    under KEY measures candidates in parallel.
``emulator``
    the aarch64 server on this machine under ``$BSCOMPILE_EMULATOR`` (default
    ``qemu-aarch64 -L /usr/aarch64-linux-gnu``) over stdio. Timings mean nothing there:
    it exercises the path without a board.

A candidate that fails to build, crashes the server, hangs past ``timeout`` or gives a
wrong result raises :class:`MeasureError` from ``time`` (``time_many`` returns it in
its place); the session is then re-established for the next candidate. Failing to
reach the device at all raises :class:`RemoteError`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import queue
import re
import shlex
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import tvm

from bscompile.errors import BscompileError
from bscompile.target import TargetSpec, resolve_target

Check = Callable[[list[np.ndarray]], Any]
Progress = Callable[[str], None]

#: Where ``bscompile package --tuning-server`` bundles put the launcher, relative to the login folder.
DEFAULT_SSH_SERVER = "bscompile-tuning-server/tuning-server"


class MeasureError(BscompileError):
    """One candidate failed: build error, crash, timeout or wrong result on the device."""


class RemoteError(BscompileError):
    """The device cannot be reached (bad URL, no server, no board under the key)."""


@dataclass(frozen=True)
class TimingConfig:
    """How a candidate is timed (``time_evaluator`` parameters).

    ``flush_cache`` (where the device's runtime has it) flushes caches before every
    repeat, one run per repeat, at least 10 repeats: for a kernel all arguments but the
    first (the weights, not the activations: ``cache_flush_cpu_non_first_arg``), for a
    Relax VM candidate ``flush_bytes`` of cache. Without it each repeat runs the candidate
    enough times to last ``min_repeat_ms`` (warm caches: what a recurrent step that reuses
    a small weight sees). Whole models (``time_artifact``) are always timed warm.
    ``timeout`` bounds one candidate's check and timing on the device.
    """

    repeat: int = 5
    number: int = 1
    min_repeat_ms: int = 20
    flush_cache: bool = True
    flush_bytes: int = 16 << 20  # what a Relax VM candidate flushes (a kernel's weights are flushed by address)
    timeout: float = 60.0


@dataclass
class Job:
    """One candidate: a PrimFunc / IRModule (built for the measurer's target) or an
    already built module, its arguments (inputs and output buffers, in call order) and
    an optional check of the arguments after one call (raise or return False to fail)."""

    lib: Any
    args: list[np.ndarray]
    check: Check | None = None
    entry: str | None = None


class Measurer(Protocol):
    """What the tuner calls. ``time`` returns seconds (median of the repeats)."""

    device: dict

    def time(self, lib_or_mod: Any, args: list[np.ndarray], check: Check | None = None, *,
             entry: str | None = None) -> float: ...

    def time_many(self, jobs: Sequence[Job], progress: Progress | None = None) -> list[float | MeasureError]: ...

    def time_artifact(self, bsc: str | os.PathLike, inputs, check: Check | None = None) -> float: ...

    def close(self) -> None: ...


# --- building candidates -----------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    """A candidate exported for the target: the shared library, the function to time and
    whether it is a Relax VM module (called through the VM) or a plain kernel library."""

    path: Path
    entry: str
    vm: bool


def _entry_and_module(lib: Any, entry: str | None) -> tuple[Any, str, bool]:
    """(thing to compile or export, name of the function to time, whether it runs on the VM)."""
    from tvm import relax

    if isinstance(lib, tvm.tirx.PrimFunc):
        if entry is None:
            attrs = lib.attrs
            entry = str(attrs["global_symbol"]) if attrs is not None and "global_symbol" in attrs else "k"
        return tvm.IRModule({entry: lib.with_attr("global_symbol", entry)}), entry, False
    if isinstance(lib, tvm.IRModule):
        vm = any(isinstance(f, relax.Function) for f in lib.functions.values())
        if entry is None:
            names = [gv.name_hint for gv in lib.functions]
            if vm:
                entry = "main"
            elif len(names) == 1:
                entry = names[0]
            else:
                raise MeasureError(f"an IRModule with {len(names)} functions needs entry=NAME")
        return lib, entry, vm
    vm = isinstance(lib, tvm.runtime.Executable) and lib.mod.implements_function("vm_load_executable")
    if entry is None and not vm:
        raise MeasureError("a built kernel library needs entry=NAME")
    return lib, entry or "main", vm


def _compile(lib: Any, spec: TargetSpec, entry: str | None) -> tuple[Any, str, bool]:
    """(built module, entry, runs on the VM) of a candidate, compiled for ``spec`` if needed."""
    mod, entry, vm = _entry_and_module(lib, entry)
    if isinstance(mod, tvm.IRModule):
        try:
            target = spec.tvm_target()
            with target:  # dlight / default schedules read the target from the context
                mod = tvm.compile(mod, target=target)
        except Exception as err:  # noqa: BLE001 - a candidate that does not build is a failed candidate
            raise MeasureError(f"build failed: {_one_line(err)}") from None
    return mod, entry, vm


def build_candidate(lib: Any, spec: TargetSpec, out_dir: str | os.PathLike, name: str,
                    entry: str | None = None) -> Built:
    """Compile (if needed) and export ``lib`` for ``spec`` (cross-linked for cross targets) to
    ``out_dir/name.so``. ``lib``: a PrimFunc, an IRModule of PrimFuncs, a Relax IRModule
    (timed through the VM, ``entry`` default ``main``) or an already built module."""
    mod, entry, vm = _compile(lib, spec, entry)
    path = Path(out_dir) / f"{name}.so"
    kwargs = {}
    if spec.cross_compiler:
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(spec.cross_compiler)
    try:
        mod.export_library(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001
        raise MeasureError(f"build failed: {_one_line(err)}") from None
    return Built(path, entry, vm)


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if isinstance(err, AssertionError):  # numpy.testing: the line that says what differs
        said = [ln for ln in lines if re.match(r"(Mismatch|Not equal|Max absolute|Arrays are not)", ln)]
        return f"AssertionError: {(said or lines or [''])[0]}"
    # TVM errors end with the message proper; tracebacks come first
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _checked(outs: list[np.ndarray], check: Check | None) -> None:
    if check is None:
        return
    try:
        ok = check(outs)
    except Exception as err:  # noqa: BLE001 - the check says why
        raise MeasureError(f"wrong result on the device: {_one_line(err)}") from None
    if ok is False:
        raise MeasureError("wrong result on the device")


#: Runs on a loaded module and its device: checks once, returns seconds.
Body = Callable[[Any, Any], float]


def _kernel_body(entry: str, args: list[np.ndarray], check: Check | None, cfg: TimingConfig) -> Body:
    def body(mod, dev) -> float:
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
        mod[entry](*tensors)
        _checked([t.numpy() for t in tensors], check)
        if cfg.flush_cache:
            timer = mod.time_evaluator(entry, dev, number=1, repeat=max(cfg.repeat, 10), min_repeat_ms=0,
                                       f_preproc="cache_flush_cpu_non_first_arg")
        else:
            timer = mod.time_evaluator(entry, dev, number=max(cfg.number, 1), repeat=cfg.repeat,
                                       min_repeat_ms=cfg.min_repeat_ms)
        return float(np.median(timer(*tensors).results))

    return body


def _body(built: Built, args: list[np.ndarray], check: Check | None, cfg: TimingConfig) -> Body:
    if built.vm:
        return _vm_body(args, check, cfg, built.entry)
    return _kernel_body(built.entry, args, check, cfg)


def _flatten(value) -> list[np.ndarray]:
    """VM outputs (a tensor or nested tuples of them) as NumPy arrays, in order."""
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [a for v in value for a in _flatten(v)]


def _vm_body(inputs: list[np.ndarray], check: Check | None, cfg: TimingConfig, func: str = "main") -> Body:
    """A Relax VM function (a one-site module, or a whole model): one call checked on its
    outputs, then timed with the VM's stateful API (works over RPC; outputs stay on the
    device). With ``flush_cache``, ``cfg.flush_bytes`` of cache are flushed before each repeat."""

    def body(mod, dev) -> float:
        from tvm.runtime.vm import VirtualMachine

        vm = VirtualMachine(mod, dev)
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
        vm.set_input(func, *tensors)
        vm.invoke_stateful(func)
        _checked(_flatten(vm.get_outputs(func)), check)
        if cfg.flush_cache:
            timer = vm.module.time_evaluator("invoke_stateful", dev, number=1, repeat=max(cfg.repeat, 10),
                                             min_repeat_ms=0, cache_flush_bytes=cfg.flush_bytes)
        else:
            timer = vm.module.time_evaluator("invoke_stateful", dev, number=max(cfg.number, 1), repeat=cfg.repeat,
                                             min_repeat_ms=cfg.min_repeat_ms)
        return float(np.median(timer(func).results))

    return body


def _artifact_inputs(bsc: str | os.PathLike, inputs) -> tuple[bytes, str, list[np.ndarray]]:
    """(module bytes, its arch, inputs in the manifest's order) of a ``.bsc`` artifact."""
    from bscompile.runtime.artifact import read_artifact

    manifest, data = read_artifact(bsc)
    if isinstance(inputs, dict):
        missing = [s.name for s in manifest.inputs if s.name not in inputs]
        if missing:
            raise BscompileError(f"{bsc}: inputs {missing} not given")
        inputs = [inputs[s.name] for s in manifest.inputs]
    return data, manifest.arch, list(inputs)


def _progress_line(done: int, total: int, best: float | None, failed: int, boards: int) -> str:
    best_s = f", best {best * 1e6:.1f} us" if best is not None else ""
    fail_s = f", {failed} failed" if failed else ""
    return f"measured {done}/{total} candidates on {boards} device(s){best_s}{fail_s}"


def _serial_many(m: "Measurer", jobs: Sequence[Job], progress: Progress | None) -> list[float | MeasureError]:
    out: list[float | MeasureError] = []
    for i, job in enumerate(jobs):
        try:
            out.append(m.time(job.lib, job.args, job.check, entry=job.entry))
        except MeasureError as err:
            out.append(err)
        if progress:
            times = [r for r in out if isinstance(r, float)]
            progress(_progress_line(i + 1, len(jobs), min(times, default=None), len(out) - len(times), 1))
    return out


# --- local ----------------------------------------------------------------------------------

class LocalMeasurer:
    """Times candidates on this machine (host targets only)."""

    def __init__(self, target: str | dict | TargetSpec = "llvm", config: TimingConfig | None = None):
        self.spec = resolve_target(target)
        if self.spec.device != "cpu" or self.spec.cross_compiler:
            raise BscompileError(f"target '{self.spec.name}' does not run on this machine: measure it on the "
                                 "device (--remote ssh://user@board, tcp://, tracker:// or emulator)")
        self.config = config or TimingConfig()
        self.device = {"remote": None, "key": None, "emulated": False, "info": [_local_info()]}
        self._tmp = tempfile.TemporaryDirectory(prefix="bscompile-measure-")

    def time(self, lib_or_mod: Any, args: list[np.ndarray], check: Check | None = None, *,
             entry: str | None = None) -> float:
        mod, entry, vm = _compile(lib_or_mod, self.spec, entry)  # run in memory: no export, no link
        body = _vm_body(args, check, self.config, entry) if vm else _kernel_body(entry, args, check, self.config)
        return self._run(mod if vm or not isinstance(mod, tvm.runtime.Executable) else mod.mod, body)

    def time_artifact(self, bsc: str | os.PathLike, inputs, check: Check | None = None) -> float:
        """Seconds per call of a compiled model's ``main`` (Relax VM), after one checked call."""
        data, arch, inputs = _artifact_inputs(bsc, inputs)
        if arch != self.spec.arch:
            raise BscompileError(f"{bsc} is an {arch} model; this machine runs {self.spec.arch}")
        path = Path(self._tmp.name) / "model.so"
        path.write_bytes(data)
        try:
            mod = tvm.runtime.load_module(str(path))
            return self._run(mod, _vm_body(inputs, check, dataclasses.replace(self.config, flush_cache=False)))
        finally:
            path.unlink(missing_ok=True)

    @staticmethod
    def _run(mod, body: Body) -> float:
        try:
            return body(mod, tvm.cpu(0))
        except MeasureError:
            raise
        except Exception as err:  # noqa: BLE001
            raise MeasureError(f"run failed: {_one_line(err)}") from None

    def time_many(self, jobs: Sequence[Job], progress: Progress | None = None) -> list[float | MeasureError]:
        return _serial_many(self, jobs, progress)

    def close(self) -> None:
        self._tmp.cleanup()


def _local_info() -> dict:
    return {"arch": platform.machine(), "cpu_model": platform.processor() or "unknown", "cpu_count": os.cpu_count(),
            "tvm": tvm.__version__}


# --- remote sessions ---------------------------------------------------------------------------

# TVM's pipe client appends its two pipe descriptors to the command; this makes them the
# command's stdin/stdout (sh cannot: dash redirects descriptors 0-9 only).
_STDIO_EXEC = ("import os, sys; *argv, r, w = sys.argv[1:]; os.dup2(int(r), 0); os.dup2(int(w), 1); "
               "os.close(int(r)); os.close(int(w)); os.execvp(argv[0], argv)")


def _pipe_session(argv: list[str]):
    """A TVM RPC session over the stdin/stdout of the command ``argv``."""
    from tvm.rpc import _ffi_api
    from tvm.rpc.client import RPCSession

    return RPCSession(_ffi_api.CreatePipeClient(sys.executable, "-c", _STDIO_EXEC, *argv))


def _tracker_call(host: str, port: int, message: list, timeout: float):
    """One request to a TVM RPC tracker, with a deadline (TrackerSession waits forever)."""
    from tvm.rpc import base

    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise RemoteError(f"{host}:{port} is not a TVM RPC tracker")
            base.sendjson(sock, message)
            return base.recvjson(sock)
    except (OSError, socket.timeout) as err:
        raise RemoteError(f"tracker {host}:{port}: {err.strerror if isinstance(err, OSError) and err.strerror else err}"
                          ) from None


@dataclass
class _Endpoint:
    """How to open a session with one board (or with any board of a tracker key)."""

    url: str
    kind: str  # "ssh" | "tcp" | "tracker" | "emulator"
    open: Callable[[float], Any]  # session_timeout -> tvm.rpc.RPCSession


class _Board:
    """A worker's session: opened lazily, re-established after a failure or before it expires."""

    def __init__(self, endpoint: _Endpoint, session_timeout: float):
        self.endpoint = endpoint
        self.session_timeout = session_timeout
        self.sess = None
        self.info: dict | None = None  # of the current session's board
        self.seen: list[dict] = []  # every board info a session of this worker reported
        self._opened = 0.0
        self._n = 0

    def session(self):
        expiring = self.session_timeout > 0 and time.monotonic() - self._opened > 0.8 * self.session_timeout
        if self.sess is not None and expiring:
            self.reset()
        if self.sess is None:
            try:
                self.sess = self.endpoint.open(self.session_timeout)
                self.info = json.loads(self.sess.get_function("bscompile.rpc.info")())
                self.seen.append(self.info)
            except BscompileError:
                raise
            except Exception as err:  # noqa: BLE001
                self.sess = None
                raise RemoteError(f"cannot open a session with {self.endpoint.url}: {_one_line(err)}") from None
            self._opened = time.monotonic()
        return self.sess

    def reset(self) -> None:
        """Close the session: the server serves one session at a time, so a session kept alive
        by a reference cycle (VM objects hold their module, which holds the session) would
        block the next client until the garbage collector ran."""
        if self.sess is not None:
            self.sess = None
            gc.collect()

    def measure(self, blob: bytes, body: Body, timeout: float) -> float:
        """Upload the shared library ``blob``, load it and run ``body`` on it under the
        device's watchdog; a crash or timeout drops the session (the next call opens one)."""
        sess = self.session()
        self._n += 1
        name = f"cand{self._n}.so"
        box: dict = {}

        def work():
            try:
                watchdog = sess.get_function("bscompile.rpc.watchdog")
                sess.upload(bytearray(blob), name)
                watchdog(timeout)
                try:
                    box["t"] = body(sess.load_module(name), sess.cpu(0))
                finally:
                    try:
                        watchdog(0)
                    except Exception:  # noqa: BLE001 - the session is gone; the caller resets it
                        pass
                sess.remove(name)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                box["err"] = err

        worker = threading.Thread(target=work, daemon=True, name="bscompile-measure")
        worker.start()
        worker.join(timeout + 30)  # the device's watchdog fires first; this covers a lost link
        if worker.is_alive():
            self.reset()
            raise MeasureError(f"no answer from {self.endpoint.url} within {timeout + 30:.0f} s")
        if "err" in box:
            err = box["err"]
            if not isinstance(err, MeasureError):
                self.reset()  # the session may be dead (crash, watchdog): start a fresh one
                raise MeasureError(f"failed on the device (a crash or the {timeout:g} s watchdog ends the "
                                   f"session): {_one_line(err)}") from None
            raise err
        return box["t"]


class RemoteMeasurer:
    """Times candidates on remote devices through TVM RPC (see the module docstring)."""

    def __init__(self, endpoint: _Endpoint, spec: TargetSpec, boards: int, config: TimingConfig,
                 session_timeout: float, emulated: bool, key: str | None):
        self.spec = spec
        self.config = config
        self._endpoint = endpoint
        self._boards = [_Board(endpoint, session_timeout) for _ in range(max(1, boards))]
        self._emulated = emulated
        self._key = key
        self._n = 0
        self._lock = threading.Lock()
        # Open the first session now: a bad URL or an absent server fails here, once.
        self._boards[0].session()
        info = self._boards[0].info or {}
        arch = str(info.get("arch", "?"))
        problem = None
        if arch != spec.arch:
            problem = f"{endpoint.url} is an {arch} device; target '{spec.name}' is {spec.arch}"
        elif info.get("tvm") not in (None, "?", tvm.__version__):
            problem = (f"{endpoint.url} runs TVM {info.get('tvm')}, this compiler {tvm.__version__}: install the "
                       "tuning server of this version (bscompile package --tuning-server)")
        if problem:
            self._boards[0].reset()
            raise RemoteError(problem)
        if config.flush_cache and not info.get("cache_flush"):
            self.config = dataclasses.replace(config, flush_cache=False)
        self._tmp = tempfile.TemporaryDirectory(prefix="bscompile-measure-")

    @classmethod
    def connect(cls, url: str, target: str | dict | TargetSpec, *, config: TimingConfig | None = None,
                parallel: int | None = None, session_timeout: float = 600.0) -> "RemoteMeasurer":
        """Open ``url`` (``ssh://``, ``tcp://``, ``tracker://`` or ``emulator``) for ``target``.

        ``parallel``: boards to use at once (tracker: default all boards registered under
        the key; others: 1). ``session_timeout``: the server ends a session after this many
        seconds (sessions are renewed before that).
        """
        spec = resolve_target(target)
        if spec.device != "cpu":
            raise RemoteError(f"remote measurement covers CPU targets; '{spec.name}' is {spec.device}")
        config = config or TimingConfig()
        endpoint, boards, key = _endpoint(url, spec, session_timeout, config)
        emulated = endpoint.kind == "emulator"
        if parallel:
            boards = parallel
        return cls(endpoint, spec, boards, config, session_timeout, emulated, key)

    @property
    def parallel(self) -> int:
        """How many boards measure at once (``time_many``)."""
        return len(self._boards)

    @property
    def device(self) -> dict:
        """What tuning records carry: the URL, the tracker key, whether it was emulated and
        the info (arch, CPU model, threads, versions) of every board a session reached."""
        # One entry per board: through a tracker, a board is its server process; over ssh/stdio
        # every session starts a new server process on the same board.
        def board(info: dict) -> dict:
            return info if self._endpoint.kind == "tracker" else {k: v for k, v in info.items() if k != "server_pid"}

        infos: list[dict] = []
        for b in self._boards:
            for info in b.seen:
                if board(info) not in map(board, infos):
                    infos.append(info)
        emulated = self._emulated or any(_looks_emulated(i) for i in infos)
        return {"remote": self._endpoint.url, "key": self._key, "emulated": emulated, "info": infos}

    def _build(self, job: Job) -> Built:
        with self._lock:
            self._n += 1
            n = self._n
        return build_candidate(job.lib, self.spec, self._tmp.name, f"cand{n}", job.entry)

    def time(self, lib_or_mod: Any, args: list[np.ndarray], check: Check | None = None, *,
             entry: str | None = None) -> float:
        built = self._build(Job(lib_or_mod, args, check, entry))
        try:
            return self._boards[0].measure(built.path.read_bytes(), _body(built, args, check, self.config),
                                           self.config.timeout)
        finally:
            built.path.unlink(missing_ok=True)

    def time_artifact(self, bsc: str | os.PathLike, inputs, check: Check | None = None) -> float:
        """Seconds per call of a compiled model's ``main`` (Relax VM) on the device, after one
        call whose outputs (flattened, in order) go to ``check``: the whole-model check of a
        tuned artifact against the untuned one or onnxruntime. ``inputs``: a list in the
        manifest's order or a dict by name."""
        data, arch, inputs = _artifact_inputs(bsc, inputs)
        if arch != self.spec.arch:
            raise RemoteError(f"{bsc} is an {arch} model; {self._endpoint.url} is {self.spec.arch}")
        warm = dataclasses.replace(self.config, flush_cache=False)
        return self._boards[0].measure(data, _vm_body(inputs, check, warm), self.config.timeout)

    def time_many(self, jobs: Sequence[Job], progress: Progress | None = None) -> list[float | MeasureError]:
        """Measure ``jobs`` on all boards at once (candidates are built here while the boards
        measure); results in the order of ``jobs``."""
        if len(self._boards) == 1:
            return _serial_many(self, jobs, progress)
        results: list[float | MeasureError | None] = [None] * len(jobs)
        todo: queue.Queue = queue.Queue(maxsize=2 * len(self._boards))
        done_lock = threading.Lock()
        state = {"done": 0, "failed": 0, "best": None}

        def finish(i: int, r: float | MeasureError) -> None:
            with done_lock:
                results[i] = r
                state["done"] += 1
                if isinstance(r, MeasureError):
                    state["failed"] += 1
                elif state["best"] is None or r < state["best"]:
                    state["best"] = r
                if progress:
                    progress(_progress_line(state["done"], len(jobs), state["best"], state["failed"],
                                            len(self._boards)))

        def worker(board: _Board) -> None:
            while True:
                item = todo.get()
                if item is None:
                    return
                i, built, job = item
                try:
                    body = _body(built, job.args, job.check, self.config)
                    finish(i, board.measure(built.path.read_bytes(), body, self.config.timeout))
                except MeasureError as err:
                    finish(i, err)
                except RemoteError as err:  # no session (board gone, tracker busy): the candidate fails
                    finish(i, MeasureError(str(err)))
                finally:
                    built.path.unlink(missing_ok=True)

        threads = [threading.Thread(target=worker, args=(b,), daemon=True) for b in self._boards]
        for t in threads:
            t.start()
        try:
            for i, job in enumerate(jobs):
                try:
                    built = self._build(job)
                except MeasureError as err:
                    finish(i, err)
                    continue
                todo.put((i, built, job))
        finally:
            for _ in threads:
                todo.put(None)
            for t in threads:
                t.join()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for b in self._boards:
            b.reset()
        self._tmp.cleanup()

    def __enter__(self) -> "RemoteMeasurer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _looks_emulated(info: dict) -> bool:
    """An aarch64 server reading an x86 /proc/cpuinfo runs under qemu-user."""
    return info.get("arch") == "aarch64" and bool(re.search(r"Intel|AMD|EPYC|Xeon", str(info.get("cpu_model", ""))))


def server_command(arch: str, tvm_version: str | None = None) -> list[str]:
    """The argv that starts this machine's cached ``arch`` tuning server under the emulator."""
    from bscompile.runtime.deploy_libs import RPC_SERVER, arch_tools, tuning_server

    folder = tuning_server(arch, tvm_version or tvm.__version__)
    emulator = os.environ.get("BSCOMPILE_EMULATOR") or arch_tools(arch).emulator
    return [*shlex.split(emulator), str(folder / "bin" / RPC_SERVER)]


def _endpoint(url: str, spec: TargetSpec, session_timeout: float,
              config: TimingConfig) -> tuple[_Endpoint, int, str | None]:
    """(how to open sessions, how many boards, tracker key) for a --remote URL."""
    from tvm import rpc

    # A server session lives as long as the client asks; the watchdog bounds every call.
    server_opts = ["--stdio", "--session-timeout", str(int(session_timeout)), "--quiet"]
    if url == "emulator":
        argv = [*server_command(spec.arch), *server_opts]
        return _Endpoint(url, "emulator", lambda _t: _pipe_session(argv)), 1, None
    def checked_port(port: str | None) -> str | None:  # (TVM's socket code took 99999 modulo 2^16)
        if port is not None and not 1 <= int(port) <= 65535:
            raise RemoteError(f"--remote '{url}': port {port} is outside 1-65535")
        return port

    m = re.fullmatch(r"ssh://(?:([^@/]+)@)?([^:/]+)(?::(\d+))?(/.*)?", url)
    if m:
        user, host, port, path = m.groups()
        checked_port(port)
        ssh = shlex.split(os.environ.get("BSCOMPILE_SSH", "ssh"))
        # ssh runs the command in the login folder: "/~/x" is "x" there (a quoted "~" would not expand)
        remote_cmd = (path[3:] if path and path.startswith("/~/") else path) or DEFAULT_SSH_SERVER
        argv = [*ssh, "-T", "-o", "BatchMode=yes", *(["-p", port] if port else []),
                f"{user}@{host}" if user else host, shlex.join([remote_cmd, *server_opts])]
        return _Endpoint(url, "ssh", lambda _t: _pipe_session(argv)), 1, None
    m = re.fullmatch(r"tcp://([^:/]+|\[[^\]]+\]):(\d+)/?", url)
    if m:
        host, port = m.group(1).strip("[]"), int(checked_port(m.group(2)))
        return _Endpoint(url, "tcp", lambda t: rpc.connect(host, port, session_timeout=t)), 1, None
    m = re.fullmatch(r"tracker://([^:/]+):(\d+)/([^/\s]+)/?", url)
    if m:
        host, port, key = m.group(1), int(checked_port(m.group(2))), m.group(3)
        from tvm.rpc.base import TrackerCode

        summary = _tracker_call(host, port, [TrackerCode.SUMMARY], 30)
        servers = [s for s in summary[1].get("server_info", []) if s.get("key") == f"server:{key}"]
        if not servers:
            raise RemoteError(f"no device is registered under key '{key}' at tracker {host}:{port} "
                              "(start: tuning-server --tracker HOST:PORT --key KEY)")

        def open_session(t: float):
            reply = _tracker_call(host, port, [TrackerCode.REQUEST, key, "", 1], config.timeout + 60)
            if reply[0] != TrackerCode.SUCCESS:
                raise RemoteError(f"tracker {host}:{port} refused a session for '{key}': {reply}")
            s_host, s_port, matchkey = reply[1]
            return rpc.connect(s_host, s_port, matchkey, session_timeout=t)

        return _Endpoint(url, "tracker", open_session), len(servers), key
    raise RemoteError(f"--remote '{url}' is not ssh://[user@]host[:port][/path], tcp://host:port, "
                      "tracker://host:port/KEY or emulator")


__all__ = ["Built", "Job", "LocalMeasurer", "MeasureError", "Measurer", "RemoteError", "RemoteMeasurer", "TimingConfig",
           "build_candidate", "server_command"]
