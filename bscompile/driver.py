"""``bscompile.compile``: ONNX -> Relax -> bscompile passes -> TVM build -> :class:`Artifact`."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import tvm

from bscompile import __version__
from bscompile.build import build
from bscompile.codegen.family import family_for
from bscompile.codegen.layout import BlockShape
from bscompile.errors import BscompileError
from bscompile.frontend.onnx import ImportedModel, import_onnx
from bscompile.passes.pipeline import run_pipeline
from bscompile.passes.sites import CompilePlan
from bscompile.runtime.artifact import Manifest, write_artifact
from bscompile.runtime.module import CompiledModule, load
from bscompile.target import TargetSpec, resolve_target

Progress = Callable[[str], None]


def stderr_progress(msg: str) -> None:
    print(f"[bscompile] {msg}", file=sys.stderr, flush=True)


@dataclass
class Artifact:
    """A compiled model in memory: the TVM executable plus its manifest."""

    executable: tvm.runtime.Executable
    manifest: Manifest
    spec: TargetSpec
    plan: CompilePlan

    def export(self, path: str | os.PathLike) -> Path:
        """Write the ``.bsc`` file atomically; cross targets link with their compiler."""
        with tempfile.TemporaryDirectory(prefix="bscompile-export-") as tmp:
            lib = Path(tmp) / self.manifest.module_file
            kwargs = {}
            if self.spec.cross_compiler:
                from tvm.support import cc

                kwargs["fcompile"] = cc.cross_compiler(self.spec.cross_compiler)
            self.executable.export_library(str(lib), **kwargs)
            write_artifact(path, self.manifest, lib)
        return Path(path)

    def load(self) -> CompiledModule:
        """Export to a temporary file and load it (host targets only)."""
        with tempfile.TemporaryDirectory(prefix="bscompile-") as tmp:
            return load(self.export(Path(tmp) / "model.bsc"))


def analyze_model(model, input_shapes=None, target="llvm", *, sparse: bool = True,
                  block: BlockShape | str | None = None, records: dict | None = None, dump_ir=None,
                  progress: Progress | None = None) -> tuple[ImportedModel, CompilePlan, tvm.IRModule, TargetSpec]:
    """Import and run bscompile's pipeline (no TVM build): what ``inspect`` reports."""
    spec = resolve_target(target)
    if isinstance(block, str):
        block = BlockShape.parse(block)
    if progress:
        progress("importing ONNX")
    im = import_onnx(model, input_shapes)
    plan = CompilePlan(im.weight_names, kernels=family_for(spec.device), vector_lanes=spec.vector_lanes,
                       sparse=sparse, force_block=block, records=records or {})
    mod = run_pipeline(im.mod, plan, dump_ir, progress)
    return im, plan, mod, spec


def compile(model: str | os.PathLike | onnx.ModelProto, target: str | dict | TargetSpec = "llvm", *,
            input_shapes: dict[str, tuple[int, ...]] | None = None, sparse: bool = True,
            block: BlockShape | str | None = None, cpu: str | None = None, records: dict | str | None = None,
            dump_ir=None,
            progress: Progress | None = None) -> Artifact:
    """Compile an ONNX model (path or ModelProto) for ``target``.

    ``sparse=False`` compiles bscompile's own dense path (same kernels, every block
    present); ``block`` forces one block shape on every weight that has zeros;
    ``records`` (a path or loaded dict) applies measured choices from ``bscompile tune``.
    """
    t0 = time.perf_counter()
    spec = resolve_target(target, cpu)
    if isinstance(records, (str, os.PathLike)):
        from bscompile.tune import load_records

        records = load_records(records)
    other = sorted({r.target for r in (records or {}).values()} - {spec.name})
    if other:  # a layout measured on one device is no evidence for another
        raise BscompileError(f"the tuning records were measured for target {', '.join(other)}; "
                             f"this compile targets {spec.name}: tune for it (bscompile tune --target {spec.name})")
    im, plan, mod, spec = analyze_model(model, input_shapes, spec, sparse=sparse, block=block, records=records,
                                        dump_ir=dump_ir, progress=progress)
    if progress:
        progress(f"building for {spec.name} ({len(plan.sites)} weight sites)")
    executable = build(mod, spec)
    manifest = Manifest(
        bscompile_version=__version__, tvm_version=tvm.__version__, target_name=spec.name,
        target=spec.target, device=spec.device, arch=spec.arch, inputs=im.inputs, outputs=im.outputs,
        weights=[s.to_json() for s in plan.sites], compile_seconds=round(time.perf_counter() - t0, 3),
        source=str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>",
    )
    if progress:
        progress(f"compiled in {manifest.compile_seconds:.1f} s")
    return Artifact(executable, manifest, spec, plan)
