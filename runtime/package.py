"""``bscompile package``: a ``.bsc`` artifact -> a Python-free deploy bundle (.tar.gz).

The bundle unpacks into one folder::

    <name>/run                      launcher (sh): ./run --input x=x.npy --output outdir/
    <name>/bin/bscompile-runner     C++ runner on the TVM FFI (runtime/deploy/runner.cc)
    <name>/lib/libtvm_ffi.so        TVM runtime libraries from the apache-tvm(-ffi) wheels
    <name>/lib/libtvm_runtime.so      for the module's architecture
    <name>/module.so                the compiled model (debug info stripped)
    <name>/manifest.json            the artifact's manifest: input/output names, shapes,
                                    dtypes, device kind ("cpu" | "cuda"), target

``bscompile package --tuning-server`` adds the device-side tuning server, started on the
board with ``./tuning-server`` (see :mod:`bscompile.runtime.remote`)::

    <name>/tuning-server            launcher (sh) of bin/bscompile-rpc-server
    <name>/bin/bscompile-rpc-server TVM RPC server on the same runtime libraries

and without an artifact it writes a bundle holding only these (plus ``lib/``), for
tuning on a board before anything is compiled for it.

``run`` execs the runner with ``LD_LIBRARY_PATH`` on ``lib/``; when
``BSCOMPILE_EMULATOR`` is set (e.g. ``qemu-aarch64 -L /usr/aarch64-linux-gnu``) it
starts the runner through it, which is how the tests run the very bundle a user ships.

CUDA (e.g. a Jetson Orin target: aarch64 host code + sm_87 device code): the manifest's
``device`` is "cuda", so the bundle also ships ``lib/libtvm_runtime_cuda.so``; the
runner loads it and creates the VM on kDLCUDA (host kDLCPU for shape code). The board
then needs the CUDA libraries that library links against (``requires["cuda"]`` in the
report: libcudart.so.13 for apache-tvm 0.27's aarch64 wheel, i.e. a CUDA 13 JetPack).

The device needs glibc and libstdc++ at least as new as ``requires`` in the report
(the runner is built with the cross toolchain's glibc: Debian 12 / Ubuntu 22.04 /
Raspberry Pi OS bookworm / JetPack 6 and newer).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from bscompile.errors import BscompileError
from bscompile.runtime.artifact import MANIFEST, atomic_write, read_artifact
from bscompile.runtime.deploy_libs import (BUNDLE_LIBS, DEPLOY_SRC, RPC_SERVER, RUNNER, DeployToolError,
                                           arch_tools, deploy_runtime, requirements, tuning_server)

Progress = Callable[[str], None]

__all__ = ["PackageError", "DeployToolError", "package_artifact", "package_tuning_server", "bundle_name"]

#: The folder a server-only bundle unpacks into (``bscompile.runtime.remote`` expects its launcher there).
TUNING_SERVER_NAME = "bscompile-tuning-server"


class PackageError(BscompileError):
    """The artifact cannot be packaged (wrong architecture, bad name, unwritable output)."""


def bundle_name(bsc_path: str | Path) -> str:
    """The bundle's folder name: the artifact's file name without ``.bsc``."""
    return Path(bsc_path).name.removesuffix(".bsc") or "model"


def _strip_debug(data: bytes, strip: str) -> bytes:
    """The module without debug info (symbols stay: TVM looks functions up by name)."""
    exe = shutil.which(strip)
    if not exe:
        return data
    with tempfile.TemporaryDirectory(prefix="bscompile-strip-") as tmp:
        lib = Path(tmp) / "module.so"
        lib.write_bytes(data)
        proc = subprocess.run([exe, "--strip-debug", str(lib)], capture_output=True, text=True)
        return lib.read_bytes() if proc.returncode == 0 else data


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise PackageError(f"bundle name '{name}' must be letters, digits, '.', '_', '+' or '-'")
    return name


def _server_entries(arch: str, tvm_version: str, progress: Progress | None) -> tuple[list, list[Path]]:
    """Bundle entries of the tuning server and the files whose requirements it adds."""
    server = tuning_server(arch, tvm_version, progress) / "bin" / RPC_SERVER
    # one launcher script: installed as `tuning-server` it starts the server instead of the runner
    return [("tuning-server", (DEPLOY_SRC / "run.sh").read_bytes(), 0o755, "runner"),
            (f"bin/{RPC_SERVER}", server, 0o755, "runner")], [server]


def package_artifact(bsc_path: str | Path, out_path: str | Path, *, name: str | None = None,
                     strip: bool = True, with_tuning_server: bool = False, progress: Progress | None = None) -> dict:
    """Write the deploy bundle for ``bsc_path`` to ``out_path`` (.tar.gz, atomically).

    Returns a size report: ``bundle_bytes`` (compressed) and per-file sizes, split into
    ``model`` (module + manifest), ``runtime_libraries`` and ``runner`` (the runner and
    its launcher), plus what the device needs (``requires``: glibc / libstdc++).
    The first call per architecture and TVM version downloads the runtime wheels and
    builds the runner; later calls reuse the cache (see ``deploy_libs``).
    ``with_tuning_server`` also ships the tuning server (``./tuning-server``).
    """
    t0 = time.perf_counter()
    manifest, data = read_artifact(bsc_path)
    name = _check_name(name or bundle_name(bsc_path))
    if manifest.arch not in ("aarch64",):
        raise PackageError(f"{bsc_path} was compiled for {manifest.arch} ({manifest.target_name}); `bscompile "
                           "package` makes aarch64 bundles: compile with --target aarch64 or a board preset "
                           "(rpi4, cortex-a76, graviton2, ...)")
    if manifest.device not in BUNDLE_LIBS:
        raise PackageError(f"{bsc_path}: device kind '{manifest.device}' cannot be packaged "
                           f"(supported: {', '.join(BUNDLE_LIBS)})")
    tools = arch_tools(manifest.arch)
    runtime = deploy_runtime(manifest.arch, manifest.tvm_version, progress)
    libs = [runtime / "lib" / lib for lib in BUNDLE_LIBS[manifest.device]]
    for src in (runtime / "bin" / RUNNER, *libs):
        if not src.exists():
            raise DeployToolError(f"the deploy runtime cache lacks {src.name} ({runtime}); "
                                  "delete that folder and package again")
    server_entries, server_files = (_server_entries(manifest.arch, manifest.tvm_version, progress)
                                    if with_tuning_server else ([], []))
    needs = requirements([runtime / "bin" / RUNNER, *server_files, *libs])

    original_sha = manifest.module_sha256
    if strip:
        data = _strip_debug(data, tools.strip)
    manifest.module_sha256 = hashlib.sha256(data).hexdigest()
    manifest.extra = dict(manifest.extra, bundle={
        "name": name, "runner": RUNNER, "libs": list(BUNDLE_LIBS[manifest.device]),
        "module_stripped": manifest.module_sha256 != original_sha, "artifact_module_sha256": original_sha,
        "requires": needs})
    manifest_blob = json.dumps(manifest.to_json(), indent=2).encode()

    # (path in bundle, bytes or source path, mode, category)
    entries: list[tuple[str, bytes | Path, int, str]] = [
        ("run", (DEPLOY_SRC / "run.sh").read_bytes(), 0o755, "runner"),
        (f"bin/{RUNNER}", runtime / "bin" / RUNNER, 0o755, "runner"),
        *[(f"lib/{lib.name}", lib, 0o755, "runtime_libraries") for lib in libs],
        (manifest.module_file, data, 0o755, "model"),
        (MANIFEST, manifest_blob, 0o644, "model"),
        *server_entries,
    ]
    files, categories = _write_bundle(out_path, name, entries, progress)
    out = Path(out_path)
    return {
        "bundle": str(out), "name": name, "arch": manifest.arch, "device": manifest.device,
        "target_name": manifest.target_name, "bundle_bytes": out.stat().st_size,
        "unpacked_bytes": sum(files.values()), **{f"{k}_bytes": v for k, v in categories.items()},
        "files": files, "module_stripped": manifest.extra["bundle"]["module_stripped"],
        "requires": needs, "package_seconds": round(time.perf_counter() - t0, 3),
    }


def package_tuning_server(out_path: str | Path, arch: str = "aarch64", *, name: str = TUNING_SERVER_NAME,
                          progress: Progress | None = None) -> dict:
    """A bundle with only the tuning server and the runtime libraries (no model), for
    ``bscompile tune --remote ssh://...`` on a board: unpack it in the login folder."""
    import tvm

    t0 = time.perf_counter()
    name = _check_name(name)
    arch_tools(arch)
    libs = [deploy_runtime(arch, tvm.__version__, progress) / "lib" / lib for lib in BUNDLE_LIBS["cpu"]]
    entries, server_files = _server_entries(arch, tvm.__version__, progress)
    entries += [(f"lib/{lib.name}", lib, 0o755, "runtime_libraries") for lib in libs]
    files, categories = _write_bundle(out_path, name, entries, progress)
    out = Path(out_path)
    return {"bundle": str(out), "name": name, "arch": arch, "device": "cpu", "target_name": "tuning-server",
            "bundle_bytes": out.stat().st_size, "unpacked_bytes": sum(files.values()),
            **{f"{k}_bytes": v for k, v in categories.items()}, "files": files,
            "requires": requirements([*server_files, *libs]), "package_seconds": round(time.perf_counter() - t0, 3)}


def _write_bundle(out_path: str | Path, name: str, entries: list, progress: Progress | None) -> tuple[dict, dict]:
    """Write ``entries`` (path in bundle, bytes or source path, mode, category) under ``name/``
    into a .tar.gz, atomically; returns per-file and per-category sizes."""
    if progress:
        progress(f"writing {out_path}")
    mtime = int(time.time())
    files: dict[str, int] = {}
    categories = {"model": 0, "runtime_libraries": 0, "runner": 0}

    def write(tmp: str) -> None:
        # GzipFile with an empty name: the temp file's name does not end up in the header.
        with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9,
                                                   mtime=mtime) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            d = tarfile.TarInfo(name)
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(d)
            for sub in ("bin", "lib"):
                d = tarfile.TarInfo(f"{name}/{sub}")
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, mtime
                tar.addfile(d)
            for rel, src, mode, cat in entries:
                payload = src if isinstance(src, bytes) else src.read_bytes()
                info = tarfile.TarInfo(f"{name}/{rel}")
                info.size, info.mode, info.mtime = len(payload), mode, mtime
                tar.addfile(info, io.BytesIO(payload))
                files[rel] = len(payload)
                categories[cat] += len(payload)
        os.chmod(tmp, 0o644)  # a plain file to hand around, not mkstemp's 0600

    try:
        atomic_write(out_path, write)
    except OSError as err:
        raise PackageError(f"cannot write {out_path} ({err.strerror or err})") from None
    return files, categories


def format_report(report: dict) -> str:
    """A few human lines for the CLI."""
    mib = 1024 * 1024
    lines = [f"{report['bundle']}: {report['bundle_bytes'] / mib:.2f} MiB compressed, "
             f"{report['unpacked_bytes'] / mib:.2f} MiB unpacked into {report['name']}/ "
             f"({report['arch']}, {report['device']})",
             f"  model {report['model_bytes'] / 1024:.1f} KiB, runtime libraries "
             f"{report['runtime_libraries_bytes'] / mib:.2f} MiB, runner {report['runner_bytes'] / 1024:.1f} KiB",
             f"  device needs glibc >= {report['requires']['glibc']}, libstdc++ (GLIBCXX) >= "
             f"{report['requires']['glibcxx']}"
             + (f", CUDA libraries {', '.join(report['requires']['cuda'])}" if "cuda" in report["requires"] else "")]
    tar = f"tar xzf {Path(report['bundle']).name}"
    if "run" in report["files"]:
        lines.append(f"  run: {tar} && ./{report['name']}/run --input NAME=FILE.npy --output DIR")
    if "tuning-server" in report["files"]:
        lines.append(f"  tune on it: {tar} in the board's login folder, then on this machine `bscompile tune "
                     f"MODEL.onnx --target TARGET --remote ssh://USER@BOARD/~/{report['name']}/tuning-server`")
    return "\n".join(lines)
