"""Load a ``.bsc`` artifact and run it from Python, checking every call's inputs."""

from __future__ import annotations

import math
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from bscompile.errors import ArtifactError, InputError
from bscompile.runtime.artifact import Manifest, read_artifact
from bscompile.runtime.threads import configure_thread_pool

configure_thread_pool()  # before TVM creates its pool (runtime/threads.py)


@tvm.register_global_func("bscompile.index_error", override=True)
def _index_error(prefix: str, value: int, lo: int, hi: int, suffix: str) -> None:
    """Called by the kernels of ``passes.check_indices`` at the first out-of-range index."""
    raise IndexError(f"{prefix}{value} outside [{lo}, {hi}){suffix}")


def host_arch() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("aarch64", "arm64") else "x86_64"


class CompiledModule:
    """A loaded artifact. ``run({name: array}) -> {output name: array}``.

    Inputs are copied into persistent aligned staging buffers that TVM reads through
    DLPack, and outputs come back zero-copy: creating TVM tensors per call costs more
    than a small sparse layer takes to run. Inputs with symbolic dims (batch, length)
    accept any size >= 1 there; their staging buffers are kept per shape (the
    ``STAGED_SHAPES`` most recent). Each output owns its memory (the ``OwnOutputs`` pass
    copies outputs that would alias an input, a constant or another output), so it
    survives later calls. Not thread-safe (neither is TVM's VM).
    """

    #: Staging buffers kept per input for shapes of symbolic dims.
    STAGED_SHAPES = 16

    def __init__(self, manifest: Manifest, lib: tvm.runtime.Module, device: tvm.runtime.Device, tmpdir=None):
        self.manifest = manifest
        self.device = device
        self._tmpdir = tmpdir  # keeps the extracted library alive with the module
        self._vm = relax.VirtualMachine(lib, device)
        self._main = self._vm["main"]
        self._cpu = device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
        self._stage: list[dict[tuple, tuple[np.ndarray, object]]] = [{} for _ in manifest.inputs]
        # Fast path: the last accepted call's (name, shape, dtype, staging buffer) per input and the VM args.
        self._last: list[tuple[str, tuple, np.dtype, np.ndarray]] | None = None
        self._last_args: list = []
        self._out_names = [s.name for s in manifest.outputs]

    @property
    def inputs(self):
        return self.manifest.inputs

    @property
    def outputs(self):
        return self.manifest.outputs

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not isinstance(feeds, dict):
            raise InputError(f"inputs: a dict {{input name: array}}, not {type(feeds).__name__}")
        expected = {s.name: s for s in self.manifest.inputs}
        unknown = sorted(set(feeds) - set(expected))
        missing = [n for n in expected if n not in feeds]
        if unknown or missing:
            raise InputError(
                "inputs do not match the model: "
                + (f"unknown {unknown}; " if unknown else "")
                + (f"missing {missing}; " if missing else "")
                + "expected " + ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in self.manifest.inputs))
        arrays = []
        sizes: dict[str, tuple[int, str]] = {}  # symbolic dim -> (size, input that set it)
        for spec in self.manifest.inputs:
            a = np.asarray(feeds[spec.name])
            if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, a.shape)):
                raise InputError(f"input '{spec.name}' has shape {list(a.shape)}, expected {list(spec.shape)}")
            for d, n in zip(spec.shape, a.shape):
                if isinstance(d, str):
                    if n < 1:
                        raise InputError(f"input '{spec.name}' has shape {list(a.shape)}: dim '{d}' must be >= 1")
                    seen = sizes.setdefault(d, (n, spec.name))
                    if seen[0] != n:
                        raise InputError(f"input '{spec.name}' has {d}={n} but input '{seen[1]}' has {d}={seen[0]}")
            if a.dtype != np.dtype(spec.dtype):
                raise InputError(f"input '{spec.name}' has dtype {a.dtype}, expected {spec.dtype}")
            a = np.require(a, requirements="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if a.dtype.kind == "f" and not _all_finite(a) and not np.isfinite(a).all():
                at = [int(i) for i in np.argwhere(~np.isfinite(a))[0]]
                raise InputError(f"input '{spec.name}' holds {a[tuple(at)]} at {at}; inputs must be finite (the "
                                 "generated code skips pruned zeros and does not propagate NaN/inf as onnxruntime)")
            arrays.append(a)
        return arrays

    def _staged(self, i: int, shape: tuple, dtype: str) -> tuple[np.ndarray, object]:
        """Input ``i``'s staging buffer for ``shape`` (and its TVM view), made on first use."""
        cache = self._stage[i]
        hit = cache.pop(shape, None)  # re-inserted: most recent last
        if hit is None:
            if len(cache) >= self.STAGED_SHAPES:
                cache.pop(next(iter(cache)))
            view = tvm.runtime.empty(shape, str(dtype))  # (64-byte aligned, as TVM reads without a copy)
            hit = (np.from_dlpack(view), view)
        cache[shape] = hit
        return hit

    def _fast_args(self, feeds) -> list | None:
        """The staged args when ``feeds`` repeat the last call's names, shapes and dtypes, else None.

        Saves the full check's per-call dict/set building (a third of ``run()`` on a small layer);
        any mismatch or non-finite value falls back to ``check_inputs``, which words the error.
        """
        last = self._last
        if last is None or type(feeds) is not dict or len(feeds) != len(last):
            return None
        for name, shape, dtype, _ in last:
            a = feeds.get(name)
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
                return None
            if dtype.kind == "f" and not _all_finite(a):
                return None
        for name, _, _, stage in last:
            np.copyto(stage, feeds[name])
        return self._last_args

    def _args(self, feeds):
        if self._cpu:
            fast = self._fast_args(feeds)
            if fast is not None:
                return fast
        arrays = self.check_inputs(feeds)
        if not self._cpu:
            return [tvm.runtime.tensor(a, self.device) for a in arrays]
        args = []
        for i, a in enumerate(arrays):
            stage, view = self._staged(i, a.shape, a.dtype)
            np.copyto(stage, a)
            args.append(view)
        self._last = [(spec.name, a.shape, a.dtype, self._staged(i, a.shape, a.dtype)[0])
                      for i, (spec, a) in enumerate(zip(self.manifest.inputs, arrays))]
        self._last_args = args
        return args

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = self._args(feeds)
        try:
            out = self._main(*args)
        except IndexError as err:  # raised by _index_error: input data, not the module, is wrong
            raise InputError(str(err).strip().splitlines()[0]) from None
        except Exception as err:  # noqa: BLE001 - TVM raises several types
            if "ErrorContext(fn=main, loc=param" not in str(err) and "Invoking function main expects" not in str(err):
                raise
            # The VM's own argument check: inputs match the manifest, so the manifest lies.
            raise ArtifactError("the module does not take the inputs its manifest lists "
                                f"({str(err).strip().splitlines()[0][:200]})") from None
        outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        if len(outs) != len(self._out_names):
            raise ArtifactError(f"the module returns {len(outs)} outputs; its manifest lists {len(self._out_names)}")
        if self._cpu:
            return dict(zip(self._out_names, map(np.from_dlpack, outs)))
        return {spec.name: o.numpy() for spec, o in zip(self.manifest.outputs, outs)}

    def benchmark(self, feeds: dict[str, np.ndarray], number: int = 10, repeat: int = 5) -> list[float]:
        """Seconds per call for each of ``repeat`` runs of ``number`` calls (TVM's timer)."""
        if not (isinstance(number, int) and isinstance(repeat, int) and number >= 1 and repeat >= 1):
            raise InputError(f"benchmark: number and repeat must be ints >= 1, not {number!r}, {repeat!r}")
        args = [tvm.runtime.tensor(a, self.device) for a in self.check_inputs(feeds)]  # own copies
        self._vm.save_function("main", "bsc_bench", *args)
        timer = self._vm.time_evaluator("bsc_bench", self.device, number=number, repeat=repeat)
        return list(timer().results)


#: The finiteness check's dot products take this many elements at a time (BLAS stays single-threaded).
_DOT_CHECK_MAX = 1 << 14


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or inf in ``a``; False may also mean only that a sum of squares overflowed.

    A sum of squares propagates NaN and inf and cannot cancel them; on small inputs it takes 0.4 us
    against ``isfinite().all()``'s 1.0 us, a sixth of a small layer's ``run()``, and unlike that it
    allocates no temporary for a C-contiguous ``a`` (``bench/results/allocations.md``: no buffer is
    allocated per call).
    """
    if a.size <= _DOT_CHECK_MAX:
        return math.isfinite(np.vdot(a, a))
    flat = a.reshape(-1)
    return all(math.isfinite(np.vdot(c, c)) for c in (flat[i : i + _DOT_CHECK_MAX]
                                                      for i in range(0, flat.size, _DOT_CHECK_MAX)))


def _device(kind: str) -> tvm.runtime.Device:
    return tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)


def load(path: str | os.PathLike) -> CompiledModule:
    manifest, data = read_artifact(path)
    if manifest.arch != host_arch():
        raise ArtifactError(
            f"{path} was compiled for {manifest.arch} ({manifest.target_name}); this machine is {host_arch()}. "
            "Run it there, e.g. with `bscompile package` and the bundle's runner")
    tmp = tempfile.TemporaryDirectory(prefix="bscompile-")
    lib_path = Path(tmp.name) / manifest.module_file
    lib_path.write_bytes(data)
    try:
        lib = tvm.runtime.load_module(str(lib_path))
        return CompiledModule(manifest, lib, _device(manifest.device), tmp)
    except Exception as err:  # noqa: BLE001 - TVM raises several types
        tmp.cleanup()
        raise ArtifactError(f"{path}: the module could not be loaded ({str(err).strip().splitlines()[-1]})") from None
