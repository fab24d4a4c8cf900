"""The deploy runner and the TVM runtime libraries it runs on, built once per
architecture and TVM version and cached.

:func:`deploy_runtime` returns a cache folder holding::

    bin/bscompile-runner        the C++ runner (runtime/deploy/runner.cc), cross-compiled
    lib/libtvm_ffi.so           from the apache-tvm-ffi wheel for the architecture
    lib/libtvm_runtime.so       from the apache-tvm wheel for the architecture
    lib/libtvm_runtime_cuda.so  (kept for CUDA bundles, e.g. Jetson Orin)
    build.json                  versions, compiler, and the glibc/libstdc++ the files need

The libraries come from the official wheels (``pip download --platform ...`` fetches
them for another architecture; nothing is installed), so a bundle runs the very
runtime that ``pip install apache-tvm`` would. Wheels are downloaded once, their
libraries and the tvm-ffi headers kept, and the wheels deleted; put the two wheels in
``$BSCOMPILE_WHEEL_DIR`` to work offline. The cache lives in ``$BSCOMPILE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/bscompile``, else ``~/.cache/bscompile``; a lock file keeps
concurrent builds (pytest -n, two shells) from racing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from bscompile.errors import BscompileError

DEPLOY_SRC = Path(__file__).resolve().parent / "deploy"
RUNNER_SOURCES = ("runner.cc", "npy.cc", "npy.h", "cli.h")
RUNNER = "bscompile-runner"
RPC_SERVER_SOURCES = ("rpc_server.cc", "cli.h")
RPC_SERVER = "bscompile-rpc-server"
#: Libraries a bundle ships per manifest device kind (cpu bundles need no CUDA).
BUNDLE_LIBS = {"cpu": ("libtvm_ffi.so", "libtvm_runtime.so"),
               "cuda": ("libtvm_ffi.so", "libtvm_runtime.so", "libtvm_runtime_cuda.so")}
_WHEEL_LIBS = ("libtvm_ffi.so", "libtvm_runtime.so", "libtvm_runtime_cuda.so")


class DeployToolError(BscompileError):
    """A tool or file needed to build the deploy runner is missing or failed."""


@dataclass(frozen=True)
class ArchTools:
    platforms: tuple[str, ...]  # pip --platform tags, most specific first
    cxx: str  # C++ compiler that builds the runner
    strip: str  # strips debug info off the module in a bundle
    objdump: str
    emulator: str  # how to run its binaries on x86-64 Linux (BSCOMPILE_EMULATOR)
    apt: str  # Debian packages that provide the tools


ARCHES: dict[str, ArchTools] = {
    "aarch64": ArchTools(
        platforms=("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                   "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
        cxx="aarch64-linux-gnu-g++", strip="aarch64-linux-gnu-strip", objdump="aarch64-linux-gnu-objdump",
        emulator="qemu-aarch64 -L /usr/aarch64-linux-gnu", apt="g++-aarch64-linux-gnu qemu-user"),
}

Progress = Callable[[str], None]


def cache_root() -> Path:
    if os.environ.get("BSCOMPILE_CACHE_DIR"):
        return Path(os.environ["BSCOMPILE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bscompile"


def arch_tools(arch: str) -> ArchTools:
    if arch not in ARCHES:
        raise DeployToolError(f"no deploy runner for {arch} modules (supported: {', '.join(ARCHES)}); "
                              "compile with --target aarch64 or a board preset such as rpi4")
    return ARCHES[arch]


def ffi_version() -> str:
    return metadata.version("apache-tvm-ffi")


def _tool_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise DeployToolError(f"{exe} does not run ({err})") from None
    return out.splitlines()[0].strip() if out else exe


def _require(exe: str, arch: str) -> str:
    path = shutil.which(exe)
    if not path:
        raise DeployToolError(f"{exe} not found: install Debian's {ARCHES[arch].apt} "
                              "(sudo apt-get install ...; see .ci/install-cross.sh)")
    return path


class _Lock:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w")  # noqa: SIM115 - held for the lock's lifetime

    def __enter__(self):
        fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _download_wheels(arch: str, tvm_version: str, ffi_ver: str, dest: Path, progress: Progress | None) -> list[Path]:
    tools = arch_tools(arch)
    reqs = [f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_ver}"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "--implementation", "cp",
           *[a for p in tools.platforms for a in ("--platform", p)], "-d", str(dest), *reqs]
    local = os.environ.get("BSCOMPILE_WHEEL_DIR")
    if local:
        cmd[4:4] = ["--no-index", "--find-links", local]
    if progress:
        progress(f"downloading the {arch} TVM runtime wheels ({', '.join(reqs)}; once, about 100 MB)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployToolError(f"could not download the {arch} runtime wheels {' '.join(reqs)}: "
                              f"{_last_line(proc.stderr or proc.stdout)} "
                              "(to work offline, put both wheels in $BSCOMPILE_WHEEL_DIR)")
    return sorted(dest.glob("*.whl"))


def _extract(wheels: list[Path], out: Path) -> None:
    """Keep the runtime libraries and the tvm-ffi headers (+ dlpack) of the wheels."""
    (out / "lib").mkdir(parents=True)
    found = set()
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                name = info.filename
                base = name.rsplit("/", 1)[-1]
                if base in _WHEEL_LIBS and "/lib/" in f"/{name}":
                    (out / "lib" / base).write_bytes(z.read(info))
                    found.add(base)
                elif name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                    rel = name[len("tvm_ffi/include/"):]
                    target = out / "include" / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(info))
    missing = [lib for lib in ("libtvm_ffi.so", "libtvm_runtime.so") if lib not in found]
    if missing or not (out / "include" / "tvm" / "ffi" / "function.h").exists():
        raise DeployToolError(f"the downloaded wheels lack {', '.join(missing) or 'the tvm-ffi headers'}")


def runtime_libs(arch: str, tvm_version: str, progress: Progress | None = None) -> Path:
    """The cached runtime libraries and tvm-ffi headers for ``arch`` (downloaded once)."""
    ffi_ver = ffi_version()
    root = cache_root() / arch
    final = root / f"libs-tvm{tvm_version}-ffi{ffi_ver}"
    if (final / "ok").exists():
        return final
    with _Lock(root / ".lock-libs"):
        if (final / "ok").exists():
            return final
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".libs-", dir=root) as tmp:
            wheels = _download_wheels(arch, tvm_version, ffi_ver, Path(tmp) / "wheels", progress)
            stage = Path(tmp) / "stage"
            _extract(wheels, stage)
            (stage / "ok").write_text(json.dumps({"tvm": tvm_version, "tvm_ffi": ffi_ver,
                                                  "wheels": [w.name for w in wheels]}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(stage, final)
    return final


def requirements(paths: list[Path]) -> dict:
    """What the device must provide for these ELF files: the newest glibc / libstdc++
    symbol versions they ask for and, for CUDA, the CUDA libraries (from their dynamic strings)."""
    need = {"glibc": (2, 17), "glibcxx": (3, 4)}
    cuda: set[str] = set()
    for p in paths:
        data = Path(p).read_bytes()
        for key, pat in (("glibc", rb"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?\x00"),
                         ("glibcxx", rb"GLIBCXX_(\d+)\.(\d+)(?:\.(\d+))?\x00")):
            for m in re.finditer(pat, data):
                v = tuple(int(g) for g in m.groups() if g is not None)
                need[key] = max(need[key], v)
        cuda.update(m.decode() for m in re.findall(rb"\x00(libcuda(?:rt)?\.so\.\d+)\x00", data))
    out = {k: ".".join(map(str, v)) for k, v in need.items()}
    if cuda:
        out["cuda"] = sorted(cuda)
    return out


def _cached_build(arch: str, tvm_version: str, exe_name: str, sources: tuple[str, ...], prefix: str,
                  defines: dict[str, str] | None = None, progress: Progress | None = None) -> Path:
    """Cross-compile ``sources`` (from runtime/deploy) against the wheel libraries into a cached
    ``<prefix>-<hash>/{bin/<exe_name>, lib/, build.json}`` folder (built once per source, compiler
    and library version)."""
    tools = arch_tools(arch)
    libs = runtime_libs(arch, tvm_version, progress)
    key_src = hashlib.sha256()
    for name in sources:
        key_src.update(name.encode() + b"\0" + (DEPLOY_SRC / name).read_bytes())
    cxx = _require(tools.cxx, arch)
    key_src.update(_tool_version(cxx).encode())
    key_src.update(libs.name.encode())
    for k, v in sorted((defines or {}).items()):
        key_src.update(f"{k}={v}".encode())
    final = cache_root() / arch / f"{prefix}-{key_src.hexdigest()[:16]}"
    if (final / "build.json").exists():
        return final
    with _Lock(cache_root() / arch / f".lock-{prefix}"):
        if (final / "build.json").exists():
            return final
        if progress:
            progress(f"building the {arch} {exe_name} with {tools.cxx} (once)")
        with tempfile.TemporaryDirectory(prefix=f".{prefix}-", dir=final.parent) as tmp:
            stage = Path(tmp) / "stage"
            (stage / "bin").mkdir(parents=True)
            (stage / "lib").mkdir()
            for lib in (libs / "lib").iterdir():
                shutil.copy2(lib, stage / "lib" / lib.name)
            exe = stage / "bin" / exe_name
            cmd = [cxx, "-std=c++17", "-O2", "-s", f"-I{libs / 'include'}", f"-I{DEPLOY_SRC}",
                   *[f"-D{k}={json.dumps(v)}" for k, v in sorted((defines or {}).items())],
                   *[str(DEPLOY_SRC / s) for s in sources if s.endswith(".cc")],
                   "-o", str(exe), f"-L{libs / 'lib'}",
                   # the runtime registers the VM loader and the RPC server: link it even though
                   # no symbol of it is used
                   "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed", "-ldl",
                   "-Wl,-rpath,$ORIGIN/../lib"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
                raise DeployToolError(f"building the {arch} {exe_name} failed: {err[0].strip()}")
            info = {"arch": arch, "tvm": tvm_version, "tvm_ffi": ffi_version(), "compiler": _tool_version(cxx),
                    "requires": requirements([exe, *(stage / "lib").iterdir()])}
            (stage / "build.json").write_text(json.dumps(info, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(stage, final)
    return final


def deploy_runtime(arch: str, tvm_version: str, progress: Progress | None = None) -> Path:
    """The cached runner + runtime libraries for ``arch``; builds the runner on first use."""
    return _cached_build(arch, tvm_version, RUNNER, RUNNER_SOURCES, "runner", progress=progress)


def tuning_server(arch: str, tvm_version: str, progress: Progress | None = None) -> Path:
    """The cached tuning server (runtime/deploy/rpc_server.cc) + runtime libraries for ``arch``:
    ``bin/bscompile-rpc-server`` and ``lib/``, built on first use like the runner."""
    defines = {"BSCOMPILE_VERSION": metadata.version("bscompile"), "BSCOMPILE_TVM_VERSION": tvm_version,
               "BSCOMPILE_TVM_FFI_VERSION": ffi_version()}
    return _cached_build(arch, tvm_version, RPC_SERVER, RPC_SERVER_SOURCES, "rpc-server", defines, progress)
