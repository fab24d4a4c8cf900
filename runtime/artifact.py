"""The compiled artifact: one ``.bsc`` file (a tar) holding the module library and a
JSON manifest that describes it and guards it with a checksum.

``manifest.json`` -- :class:`Manifest`; ``module.so`` -- TVM ``export_library``
output for the artifact's target. Writes are atomic (temp file + rename), so a
failed compile or export never leaves a half-written artifact behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm

from bscompile.errors import ArtifactError, BscompileError
from bscompile.sites import TensorSpec

#: 2: a ``TensorSpec`` dim may be a string, the name of a symbolic dim (any size >= 1).
FORMAT_VERSION = 2
#: Formats this version reads (1 has static shapes only).
READ_FORMATS = (1, 2)
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    bscompile_version: str
    tvm_version: str
    target_name: str
    target: dict
    device: str
    arch: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: list[dict]
    module_file: str = "module.so"
    module_sha256: str = ""
    compile_seconds: float = 0.0
    source: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        d = dict(d)
        if d.get("format_version") not in READ_FORMATS:
            raise ArtifactError(f"artifact format {d.get('format_version')} is not supported "
                                f"(this bscompile reads format {FORMAT_VERSION})")
        d["inputs"] = [TensorSpec.from_json(t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec.from_json(t) for t in d["outputs"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> dict:
        """Totals over all weights: dense bytes, stored bytes, saved bytes."""
        dense = sum(w["dense_bytes"] for w in self.weights)
        stored = sum(w.get("stored_bytes", w["dense_bytes"]) for w in self.weights)
        return {"weights": len(self.weights), "dense_bytes": dense, "stored_bytes": stored,
                "bytes_saved": dense - stored}


def check_output_path(path: str | os.PathLike, inputs: tuple = ()) -> None:
    """Refuse to write ``path`` where the write would replace something else than a file of ours: an
    existing directory, device or FIFO (renamed over, ``-o /dev/null`` as root replaced the device),
    one of ``inputs`` (the model or artifact the command reads), or below a path that is a file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise BscompileError(f"'{path}' exists and is not a regular file; give a file path")
    for src in inputs:
        if path.exists() and Path(src).exists() and os.path.samefile(path, src):
            raise BscompileError(f"the output '{path}' is the input '{src}'; give another output path")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise BscompileError(f"cannot write '{path}': '{parent}' is not a directory")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; on failure nothing is left. (Commands
    check their outputs against their inputs first: :func:`check_output_path`.)"""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack_imports_incbin(mod, is_system_lib: bool, symbol_prefix: str, workspace_dir: str,
                        cc: str | None = None) -> str:
    """``export_library``'s ``fpack_imports``: the serialized imports (the VM bytecode and
    its constants, i.e. every packed weight) as an assembler ``.incbin`` of a raw file,
    assembled by ``cc`` into an object when given (else the linking compiler assembles it).

    TVM's default turns the blob into one LLVM constant array and has LLVM emit it:
    ~2 s for the 2560 DeepSpeech-like model's 130 MB. The assembler copies the bytes.
    Same symbol, same bytes; ELF targets (every target here) with a GNU-compatible
    ``cc``; a system library (which registers the blob at start-up) is not supported.
    """
    if is_system_lib:
        raise ValueError("pack_imports_incbin does not pack system libraries")
    blob = Path(workspace_dir) / f"{symbol_prefix}devc.bin"
    packed = tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod)
    np.from_dlpack(packed).tofile(blob)  # (a view: .numpy() would copy the 100 MB blob first)
    symbol = symbol_prefix + tvm.get_global_func("runtime.ModuleImportsBlobName")()
    asm = Path(workspace_dir) / f"{symbol_prefix}devc.S"
    asm.write_text(f"""\t.section .rodata.{symbol},"a"
\t.globl {symbol}
\t.type {symbol}, %object
{symbol}:
\t.incbin "{blob}"
\t.size {symbol}, . - {symbol}
\t.section .note.GNU-stack,"",%progbits
""")
    if cc is None:
        return str(asm)
    obj = asm.with_suffix(".o")
    subprocess.run([cc, "-c", str(asm), "-o", str(obj)], check=True, capture_output=True)
    return str(obj)


def write_artifact(path: str | os.PathLike, manifest: Manifest, module_path: str | os.PathLike) -> None:
    """The manifest and the module (a shared library) in an uncompressed tar, written atomically.
    The module is hashed from a memory map and streamed from its file: its weights are not
    copied into memory."""
    with open(module_path, "rb") as module, mmap.mmap(module.fileno(), 0, access=mmap.ACCESS_READ) as data:
        manifest.module_sha256 = hashlib.sha256(data).hexdigest()
        blob = json.dumps(manifest.to_json(), indent=2).encode()

        def write(tmp: str) -> None:
            with tarfile.open(tmp, "w") as tar:
                for name, payload, size in ((MANIFEST, io.BytesIO(blob), len(blob)),
                                            (manifest.module_file, module, len(data))):
                    info = tarfile.TarInfo(name)
                    info.size = size
                    info.mode = 0o644
                    tar.addfile(info, payload)

        atomic_write(path, write)


def _check_manifest(manifest: Manifest) -> None:
    """What the loaders trust: a module file name without folders (it is joined to a temporary
    folder: ``../x`` or ``/x`` wrote outside it), inputs and outputs of known dtypes with dims >= 0
    or symbolic. (The module itself is covered by its checksum; the manifest is not.)"""
    name = manifest.module_file
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"module_file {name!r} is not a file name")
    for spec in (*manifest.inputs, *manifest.outputs):
        np.dtype(spec.dtype)  # (TypeError for an unknown one)
        if not spec.name or any(not (isinstance(d, str) or (isinstance(d, int) and 0 <= d < 2**31)) for d in spec.shape):
            raise ValueError(f"tensor {spec.name!r} has shape {list(spec.shape)}")


def read_artifact(path: str | os.PathLike) -> tuple[Manifest, bytes]:
    """Read and verify an artifact; raise :class:`ArtifactError` saying what is wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArtifactError(f"artifact: a path, not {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no such artifact: {path}")
    try:
        with tarfile.open(path, "r:") as tar:  # written uncompressed
            members = {m.name: m for m in tar.getmembers()}
            if MANIFEST not in members:
                raise ArtifactError(f"{path} is not a bscompile artifact (no {MANIFEST})")
            manifest = Manifest.from_json(json.loads(tar.extractfile(members[MANIFEST]).read()))
            _check_manifest(manifest)
            if manifest.module_file not in members:
                raise ArtifactError(f"{path} is truncated: {manifest.module_file} is missing")
            data = tar.extractfile(members[manifest.module_file]).read()
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a folder, not an artifact") from None
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as err:
        if path.suffix == ".onnx":
            raise ArtifactError(f"{path} is an ONNX model, not a compiled artifact: compile it first "
                                "(bscompile compile)") from None
        raise ArtifactError(f"{path} is corrupted or truncated ({str(err).strip().splitlines()[0]})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # (JSONDecodeError is a ValueError)
        raise ArtifactError(f"{path} has an invalid manifest ({err})") from None
    if hashlib.sha256(data).hexdigest() != manifest.module_sha256:
        raise ArtifactError(f"{path} is corrupted: the module's checksum does not match its manifest")
    return manifest, data
