"""Turn TVM's CUDA C source into a host shared library that runs it on the emulator.

The source compiles with g++ against ``cuda_emu.h`` after one rewrite: ``__shared__``
arrays become per-block storage handed out by the runtime (g++ also rejects their
``static alignas`` form). Every kernel gets an entry point ``__tvm_ffi_<kernel>`` taking
the kernel's arguments followed by the launch parameters, as TVM's host code calls a
CUDA function, so TVM loads the result as an ordinary library module. Builds are cached
by content hash: the same source always maps to the same file.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

from bscompile.errors import BscompileError
from bscompile.runtime.cuda_emulator.serialized import (
    DL_FLOAT, DL_HANDLE, DYN_SHARED_TAG, CudaModuleBlob, KernelInfo)

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu.h"
RUNTIME_SRC = HERE / "cuda_emu_rt.cc"

#: Sanitizer flags by mode ("" = the plain emulator, which still checks alignment itself).
SANITIZE_FLAGS = {
    "": ["-fsanitize=alignment"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-omit-frame-pointer",
                "-DCUEMU_SANITIZE"],
    # the runtime is built without -fsanitize=thread (see cuda_emu_rt.cc), the kernels with it
    "thread": ["-fsanitize=thread", "-DCUEMU_SANITIZE", "-DCUEMU_TSAN"],
}
CXXFLAGS = ["-std=c++17", "-fPIC", "-fno-strict-aliasing", "-fno-fast-math", "-w"]
#: Kernels unoptimised: g++ -O1 takes 2.3x longer on TVM's unrolled source and saves less run time
#: than that (the scheduler's fiber switches dominate), so only the runtime is optimised.
KERNEL_OPT, RUNTIME_OPT = "-O0", "-O2"

_SHARED = re.compile(
    r"(?P<ext>extern\s+)?__shared__\s+(?:(?:alignas|__align__)\((?P<align>\d+)\)\s+)?"
    r"(?P<type>[A-Za-z_][\w ]*?)\s+(?P<name>\w+)\[(?P<size>[^\]]*)\]\s*;")
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\((?P<lb>[^)]*)\)\s+)?(?P<name>\w+)\s*\((?P<params>[^)]*)\)')
_DIM = {"blockIdx.x": 0, "blockIdx.y": 1, "blockIdx.z": 2, "threadIdx.x": 3, "threadIdx.y": 4, "threadIdx.z": 5}


class EmulatorBuildError(BscompileError):
    """The CUDA source could not be built for the emulator (or no g++ is installed)."""


def cache_dir() -> Path:
    base = os.environ.get("BSCOMPILE_CUDA_EMU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bscompile", "cuda_emulator")
    Path(base).mkdir(parents=True, exist_ok=True)
    return Path(base)


def rewrite_shared(source: str) -> str:
    """``__shared__ T a[n];`` -> a pointer into the block's shared memory (line count kept)."""

    def sub(m: re.Match) -> str:
        t, name = m["type"].strip(), m["name"]
        if m["ext"]:
            return f"{t}* {name} = ({t}*)cuemu_dyn_shared();"
        return f"{t}* {name} = ({t}*)cuemu_shared(sizeof({t}) * ({m['size']}), {m['align'] or 16}, __LINE__);"

    return _SHARED.sub(sub, source)


def _param_types(params: str) -> list[str]:
    out = []
    for p in (p.strip() for p in params.split(",") if p.strip()):
        out.append(re.sub(r"\s*\b\w+$", "", p).replace("__restrict__", "").strip())
    return out


def _definition(source: str, kernel: str) -> str:
    """The text of ``kernel``'s definition (from its signature to the next kernel)."""
    heads = [m for m in _KERNEL.finditer(source) if m["name"] == kernel]
    start = heads[-1].start()
    nxt = source.find('extern "C"', heads[-1].end())
    return source[start:nxt if nxt >= 0 else len(source)]


def entry_points(source: str, kernels: dict[str, KernelInfo]) -> str:
    """C++ for one ``__tvm_ffi_<kernel>`` per kernel (appended after the kernels)."""
    decls = {m["name"]: m for m in _KERNEL.finditer(source)}
    out = ['\nextern "C" {',
           "void* cuemu_arg_ptr(const void*, int); int64_t cuemu_arg_int(const void*, int);",
           "double cuemu_arg_float(const void*, int);",
           "int cuemu_launch(const char*, int, void (*)(void*), void*, const unsigned*, uint64_t, int);",
           "int TVMFFIErrorSetRaisedFromCStr(const char*, const char*);", "}"]
    for key, info in kernels.items():
        d = decls.get(info.name)
        if d is None:
            raise EmulatorBuildError(f"kernel {info.name} is not defined in the CUDA source")
        types = _param_types(d["params"])
        if len(types) != len(info.arg_types):
            raise EmulatorBuildError(f"kernel {info.name}: {len(types)} parameters in the source, "
                                     f"{len(info.arg_types)} in the function table")
        lb = int(d["lb"].split(",")[0]) if d["lb"] else 0
        spins = "__nanosleep" in _definition(source, info.name)  # waits for other blocks: run them at once
        n = len(types)
        fields = "".join(f" {t} a{i};" for i, t in enumerate(types))
        unpack = []
        for i, (t, (code, _, _)) in enumerate(zip(types, info.arg_types)):
            get = "cuemu_arg_ptr" if code == DL_HANDLE else "cuemu_arg_float" if code == DL_FLOAT else "cuemu_arg_int"
            unpack.append(f"  a.a{i} = ({t}){get}(args, {i});")
        dims = []
        for j, tag in enumerate(info.launch_args):
            if tag == DYN_SHARED_TAG:
                dims.append(f"  dyn = (uint64_t)cuemu_arg_int(args, {n + j});")
            elif tag in _DIM:
                dims.append(f"  {{ int64_t v = cuemu_arg_int(args, {n + j}); if (v > 0) dims[{_DIM[tag]}] = "
                            f"(unsigned)v; }}")
            else:
                raise EmulatorBuildError(f"kernel {info.name}: unsupported launch parameter {tag}")
        nargs = n + len(info.launch_args)
        call = ", ".join(f"a->a{i}" for i in range(n))
        out += [
            f"struct cuemu_args_{key} {{{fields} char cuemu_pad; }};",
            f"static void cuemu_body_{key}(void* p) {{ cuemu_args_{key}* a = (cuemu_args_{key}*)p; "
            f"{info.name}({call}); }}",
            f'extern "C" __attribute__((visibility("default"))) int __tvm_ffi_{key}(void*, const void* args, '
            "int32_t nargs, void*) {",
            f"  if (nargs != {nargs}) {{ TVMFFIErrorSetRaisedFromCStr(\"RuntimeError\", "
            f"\"cuda emulator: {info.name} called with the wrong number of arguments\"); return -1; }}",
            f"  cuemu_args_{key} a;",
            *unpack,
            "  unsigned dims[6] = {1, 1, 1, 1, 1, 1}; uint64_t dyn = 0;",
            *dims,
            f'  return cuemu_launch("{info.name}", {lb}, &cuemu_body_{key}, &a, dims, dyn, {int(spins)});',
            "}",
        ]
    return "\n".join(out) + "\n"


def _gxx(args: list[str], what: str, source_path: Path | None = None) -> None:
    try:
        proc = subprocess.run(["g++", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise EmulatorBuildError("the CUDA emulator needs g++ (not found on PATH)") from None
    if proc.returncode != 0:
        raise EmulatorBuildError(f"g++ failed to build {what}"
                                 + (f" ({source_path})" if source_path else "") + ":\n" + proc.stderr[-3000:])


def _atomic_build(out: Path, build) -> Path:
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        tmp_out = Path(tmp) / out.name
        build(Path(tmp), tmp_out)
        os.replace(tmp_out, out)
    return out


def _tvm_ffi_lib() -> str:
    import tvm_ffi.libinfo

    return tvm_ffi.libinfo.find_libtvm_ffi()


def sanitizer_env(env: dict | None = None, mode: str = "address") -> dict:
    """Environment for a Python process that loads sanitizer-built modules: the sanitizer runtime
    must be the first library loaded (LD_PRELOAD, with libstdc++ for its C++ interceptors), Python's
    own SIGSEGV handler must not hide its reports, and CPython's arena allocator "leaks" by design.
    Start the Python binary itself (``sys.executable``), not a shell wrapper such as pyenv's shim."""
    env = dict(os.environ if env is None else env)
    runtime = {"address": "libasan.so", "thread": "libtsan.so"}[mode]
    libs = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in (runtime, "libstdc++.so")]
    env["LD_PRELOAD"] = " ".join(libs + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env["ASAN_OPTIONS"] = "allow_user_segv_handler=0:detect_leaks=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:report_signal_unsafe=0:report_thread_leaks=0"
    return env


def runtime_library(sanitize: str = "") -> Path:
    """The emulator runtime (fibers, scheduler, checks), built once per content and mode."""
    flags = SANITIZE_FLAGS[sanitize]
    key = hashlib.sha256(RUNTIME_SRC.read_bytes() + HEADER.read_bytes()
                         + " ".join(CXXFLAGS + [RUNTIME_OPT] + flags).encode())
    out = cache_dir() / f"libcuda_emu_rt_{key.hexdigest()[:16]}.so"
    lib = _tvm_ffi_lib()
    rt_flags = [f for f in flags if f not in ("-fsanitize=alignment", "-fsanitize=thread")]

    def build(tmp: Path, dst: Path) -> None:
        _gxx([*CXXFLAGS, RUNTIME_OPT, *rt_flags, "-shared", "-I", str(HERE), str(RUNTIME_SRC), "-o", str(dst), lib,
              f"-Wl,-rpath,{Path(lib).parent}"], "the CUDA emulator runtime")

    return _atomic_build(out, build)


def build_module(blob: CudaModuleBlob, sanitize: str = "") -> Path:
    """Compile a CUDA module's source for the emulator; returns the shared library's path."""
    if blob.fmt != "cuda":
        raise EmulatorBuildError(f"the CUDA module holds {blob.fmt}, not CUDA C source: nothing to emulate")
    rt = runtime_library(sanitize)
    source = rewrite_shared(blob.source) + entry_points(blob.source, blob.kernels)
    flags = SANITIZE_FLAGS[sanitize]
    key = hashlib.sha256((source + str(rt) + " ".join(CXXFLAGS + [KERNEL_OPT] + flags)).encode()).hexdigest()[:20]
    out = cache_dir() / f"cuda_module_{key}.so"

    def build(tmp: Path, dst: Path) -> None:
        src = tmp / "module.cc"
        src.write_text(source)
        obj = tmp / "module.o"
        _gxx([*CXXFLAGS, KERNEL_OPT, *flags, "-include", str(HEADER), "-I", str(HERE / "include"), "-c", str(src), "-o",
              str(obj)], "the emulated CUDA module", src)
        link_san = [f for f in flags if f.startswith("-fsanitize=") and f != "-fsanitize=alignment"]
        _gxx(["-shared", *link_san, str(obj), "-o", str(dst), str(rt), f"-Wl,-rpath,{rt.parent}"],
             "the emulated CUDA module")

    return _atomic_build(out, build)
