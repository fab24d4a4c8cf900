"""Run bscompile's CUDA artifacts and kernels on the CPU, with the checks a GPU would make.

No machine this project builds on has a GPU. The emulator makes TVM's unchanged host
code and Relax VM run a CUDA module anyway, by replacing two TVM registry entries
(both free, since TVM's CUDA runtime cannot load without ``libcuda.so.1``):

- ``device_api.cuda`` returns TVM's CPU device API: ``tvm.cuda(0)`` tensors are host
  memory whose DLDevice still says CUDA, so copies and allocations just work;
- ``ffi.Module.load_from_bytes.cuda`` parses TVM's serialised CUDA module
  (:mod:`.serialized`), compiles its CUDA C source with g++ against ``cuda_emu.h``
  (:mod:`.build`) and returns the result as a library module whose functions take the
  kernel arguments followed by the launch parameters, exactly as TVM calls a kernel.

Each CUDA thread runs as a fiber (``cuda_emu_rt.cc``); ``__syncthreads`` is a real
barrier and a shuffle waits for every lane of its mask. A launch fails with
:class:`EmulatorError` on: barrier divergence (a thread exits or waits at another
barrier), a shuffle whose mask omits the caller or a lane it reads, a lane of the mask
that never arrives (deadlock), block dimensions over ``__launch_bounds__`` or the
hardware limits, static shared memory over 48 KiB, a misaligned vector access
(``float4`` not 16-byte aligned). Shared memory starts poisoned (NaN / -1), and
threads and blocks run forward, in reverse or in a seeded random order, so a missing
barrier or an order-dependent race changes the result. Blocks run one at a time, except
for kernels whose blocks wait for each other (spin-waits), which run co-resident: all
blocks at once, a deadlock reported when no thread can make progress. ``sanitize="address"`` builds
everything with ASan+UBSan (out-of-bounds accesses; the process must preload libasan).

Installing is per process and cannot be undone (TVM caches what it loaded): run
emulated code in a subprocess, which also keeps a memory fault from taking the caller down.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, replace
from typing import Callable

from bscompile.runtime.cuda_emulator.build import EmulatorBuildError, build_module, runtime_library
from bscompile.runtime.cuda_emulator.serialized import cuda_blobs_of_packed_imports, parse_cuda_module

ORDERS = {"forward": 0, "reverse": 1, "random": 2}

__all__ = ["EmulatorError", "EmulatorBuildError", "Launch", "install", "configure", "launches", "clear_launches",
           "emulate_host_module", "ORDERS"]


class EmulatorError(RuntimeError):
    """A kernel did something a GPU would reject or mis-execute."""


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dyn_shared: int


@dataclass
class _State:
    sanitize: str = ""
    source_filter: Callable[[str], str] | None = None
    rt: ctypes.CDLL | None = None


_state = _State()


def _rt() -> ctypes.CDLL:
    if _state.rt is None:
        lib = ctypes.CDLL(str(runtime_library(_state.sanitize)), mode=ctypes.RTLD_GLOBAL)
        lib.cuemu_configure.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64]
        lib.cuemu_log_size.restype = ctypes.c_uint64
        lib.cuemu_log_entry.restype = ctypes.c_char_p
        lib.cuemu_log_entry.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint64)]
        _state.rt = lib
    return _state.rt


def _load_cuda_bytes(data) -> "tvm.runtime.Module":  # noqa: F821
    import tvm

    blob = parse_cuda_module(bytes(data))
    if _state.source_filter is not None:
        blob = replace(blob, source=_state.source_filter(blob.source))
    return tvm.runtime.load_module(str(build_module(blob, _state.sanitize)))


def install(order: str = "forward", seed: int = 0, coresident: bool | None = None, sanitize: str = "",
            source_filter: Callable[[str], str] | None = None) -> None:
    """Route this process's CUDA device and CUDA modules to the emulator.

    ``source_filter`` rewrites each module's CUDA source before it is compiled (the
    mutation tests inject faults with it). Calling again changes the settings for
    modules loaded afterwards; ``sanitize`` is fixed by the first call.
    """
    import tvm  # noqa: F401 - registers TVM's device APIs
    import tvm_ffi

    if _state.rt is not None and sanitize != _state.sanitize:
        raise ValueError("the sanitizer mode is fixed when the emulator is first installed")
    _state.sanitize = sanitize
    _state.source_filter = source_filter
    configure(order, seed, coresident)
    cpu_api = tvm_ffi.get_global_func("device_api.cpu")
    tvm_ffi.register_global_func("device_api.cuda", lambda: cpu_api(), override=True)
    tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", _load_cuda_bytes, override=True)


def configure(order: str = "forward", seed: int = 0, coresident: bool | None = None, spin_limit: int = 0) -> None:
    """Thread/block order of the following launches.

    ``coresident``: run all blocks of a launch at once (True), one block after another
    (False), or at once only for kernels that spin-wait on other blocks (None: a kernel
    with ``__nanosleep``, like the persistent recurrent kernel). ``spin_limit``: scheduler
    rounds in which only spin-waits run before a deadlock is reported (0: the default).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    _rt().cuemu_configure(ORDERS[order], seed, -1 if coresident is None else int(coresident), spin_limit)


def launches() -> list[Launch]:
    """Every kernel launch since the last :func:`clear_launches`, in order."""
    rt = _rt()
    out = []
    dims = (ctypes.c_uint * 6)()
    dyn = ctypes.c_uint64()
    for i in range(rt.cuemu_log_size()):
        name = rt.cuemu_log_entry(i, dims, ctypes.byref(dyn)).decode()
        out.append(Launch(name, tuple(dims[:3]), tuple(dims[3:]), dyn.value))
    return out


def clear_launches() -> None:
    _rt().cuemu_log_clear()


def emulate_host_module(host) -> None:
    """Replace the CUDA imports of an in-memory ``tvm.compile`` result by emulated ones.

    For kernels built in this process (no export / load round trip); call before the
    first call of any of its functions. ``host`` is the executable or its ``.mod``.
    """
    import tvm_ffi

    mod = getattr(host, "mod", host)
    packed = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod)
    blobs = cuda_blobs_of_packed_imports(packed.numpy().tobytes())
    if not blobs:
        raise EmulatorBuildError("the module imports no CUDA module")
    others = [m for m in mod.imports if m.kind != "cuda"]
    mod.clear_imports()
    for m in others:
        mod.import_module(m)
    for b in blobs:
        mod.import_module(_load_cuda_bytes(b))


@contextlib.contextmanager
def raised_as_emulator_error():
    """Turn the emulator's launch failures (raised through TVM) into :class:`EmulatorError`."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - TVM re-raises as several types
        msg = str(err)
        if "cuda emulator:" in msg:
            line = next(ln for ln in msg.splitlines() if "cuda emulator:" in ln)
            raise EmulatorError(line[line.index("cuda emulator:"):]) from None
        raise
