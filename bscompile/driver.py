"""``bscompile.compile``: ONNX -> Relax -> the ``bscompile`` pipeline -> TVM build -> :class:`Artifact`.

The artifact's manifest is read from the final IR: its signature (``bscompile.signature``, from the
frontend) and weights (``bscompile.weights``, from ``RecordWeights``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.ir.instrument import DumpIR

from bscompile import __version__
from bscompile.codegen.layout import BlockShape
from bscompile.errors import BscompileError
from bscompile.frontend.onnx import ImportedModel, import_onnx
from bscompile.passes.pipeline import bscompile_passes
from bscompile.passes.report_generic_products import GENERIC_PRODUCTS, describe
from bscompile.records import TuningRecord, check_schedules, load_records
from bscompile.runtime.artifact import Manifest, pack_imports_incbin, write_artifact
from bscompile.runtime.module import CompiledModule, load
from bscompile.sites import recorded_signature, recorded_weights
from bscompile.target import TargetSpec, resolve_target

Progress = Callable[[str], None]
_log = logging.getLogger(__name__)


def stderr_progress(msg: str) -> None:
    print(f"[bscompile] {msg}", file=sys.stderr, flush=True)


@dataclass
class Artifact:
    """A compiled model in memory: the TVM executable plus its manifest.

    ``timings``: where compile time went, ``(label, wall s, CPU s, resident MiB at
    its end)`` in order: the phases (import, the Relax pipeline's passes indented under
    it, the build: TIR passes and the rest, which is LLVM's code generation).
    """

    executable: tvm.runtime.Executable
    manifest: Manifest
    spec: TargetSpec
    timings: list[tuple[str, float, float, float]] = field(default_factory=list)

    def export(self, path: str | os.PathLike) -> Path:
        """Write the ``.bsc`` file atomically; cross targets link with their compiler."""
        with tempfile.TemporaryDirectory(prefix="bscompile-export-") as tmp:
            lib = Path(tmp) / self.manifest.module_file
            from tvm.support import cc

            kwargs = {}
            if self.spec.cross_compiler:
                if shutil.which(self.spec.cross_compiler) is None:
                    package = "g++-" + self.spec.cross_compiler.removesuffix("-g++")
                    raise BscompileError(f"the {self.spec.name} target links with {self.spec.cross_compiler}, which is "
                                         f"not on PATH (Debian and Ubuntu: apt install {package})")
                kwargs["fcompile"] = cc.cross_compiler(self.spec.cross_compiler)
            # the weights are serialised and assembled in a second thread while LLVM writes the
            # kernels' objects (in C++, without the GIL); export_library takes the object once it asks
            with ThreadPoolExecutor(1) as pool:
                packed = pool.submit(pack_imports_incbin, self.executable.mod, False, "", tmp,
                                     self.spec.cross_compiler or cc.get_cc())
                self.executable.export_library(str(lib), fpack_imports=lambda *_: packed.result(), **kwargs)
            write_artifact(path, self.manifest, lib)
        return Path(path)

    def load(self) -> CompiledModule:
        """Export to a temporary file and load it (host targets only)."""
        with tempfile.TemporaryDirectory(prefix="bscompile-") as tmp:
            return load(self.export(Path(tmp) / "model.bsc"))


def _options(spec: TargetSpec, sparse: bool, block: BlockShape | str | None, records) -> dict:
    if isinstance(block, str):
        try:
            block = BlockShape.parse(block)
        except ValueError:
            raise BscompileError(f"invalid block shape '{block}'; expected RxC, e.g. 4x4") from None
    if block is not None and not isinstance(block, BlockShape):
        raise BscompileError(f"block: 'RxC' (e.g. '4x4') or a BlockShape, not {block!r}")
    if isinstance(records, (str, os.PathLike)):
        records = load_records(records)
    if not all(isinstance(r, TuningRecord) for r in (records or {}).values()):
        raise BscompileError("records: a tuning records file, or a dict of TuningRecord (bscompile.records.load_records)")
    other = sorted({r.target for r in (records or {}).values()} - {spec.name})
    if other:  # a layout measured on one device is no evidence for another
        raise BscompileError(f"the tuning records were measured for target {', '.join(other)}; "
                             f"this compile targets {spec.name}: tune for it (bscompile tune --target {spec.name})")
    if any((r.device or {}).get("emulated") for r in (records or {}).values()):  # plumbing, not evidence
        _log.warning("bscompile: warning: the tuning records were measured on an emulated device: their "
                     "choices mean nothing for a real board (tune on it: bscompile tune --remote ssh://...)")
    check_schedules(records or {}, spec.kernel_family())
    return {"sparse": sparse, "force_block": block, "records": records or {}}


@tvm.ir.instrument.pass_instrument
class _Progress:
    """Reports bscompile's own passes as they start."""

    def __init__(self, progress: Progress, names: set[str]):
        self.progress, self.names = progress, names

    def run_before_pass(self, mod, info):
        if info.name in self.names:
            self.progress(f"pass {info.name}")


def _clock() -> np.ndarray:
    """(wall, CPU) seconds: on a shared host the wall time alone says little."""
    return np.array([time.perf_counter(), time.process_time()])


def _rss_mib() -> float:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@tvm.ir.instrument.pass_instrument
class PassTimes:
    """Wall and CPU time of every pass down to ``depth`` levels of nesting (a
    ``Sequential`` is a level). TVM's ``PassTimingInstrument`` renders text only and
    times only its C++ passes as a tree; this one keeps numbers for the report."""

    def __init__(self, depth: int = 2):
        self.depth, self.stack, self.times = depth, [], []

    def run_before_pass(self, mod, info):
        self.stack.append((len(self.times), _clock()))
        if len(self.stack) <= self.depth:
            self.times.append(["  " * (len(self.stack) - 1) + info.name, np.zeros(3)])

    def run_after_pass(self, mod, info):
        i, t0 = self.stack.pop()
        if len(self.stack) < self.depth:
            self.times[i][1] = np.append(_clock() - t0, _rss_mib())

    def rows(self) -> list[tuple[str, np.ndarray]]:
        """(name, [wall, CPU, RSS MiB after]); passes of one name and level that ran back
        to back are summed (TVM's TIR pipeline runs some passes once per function)."""
        out: list[tuple[str, np.ndarray]] = []
        for name, t in self.times:
            if out and out[-1][0] == name:
                out[-1] = (name, np.append(out[-1][1][:2] + t[:2], t[2]))
            else:
                out.append((name, t))
        return out


def _run(passes: tvm.transform.Pass, mod: tvm.IRModule, spec: TargetSpec, dump_ir, progress,
         timer: PassTimes | None = None) -> tvm.IRModule:
    outer = tvm.transform.PassContext.current()  # the caller's options: disabled passes, config, instruments
    instruments = list(outer.instruments)  # e.g. the tests' well-formedness check
    if timer is not None:
        instruments.append(timer)
    if dump_ir is not None:
        dump = DumpIR(dump_ir, refresh=True)
        Path(dump_ir).mkdir(parents=True, exist_ok=True)
        (Path(dump_ir) / "000_import.py").write_text(mod.script())
        dump.counter = 1  # the passes' dumps follow the import, numbered by TVM
        instruments.append(dump)
    if progress is not None:
        instruments.append(_Progress(progress, {p.info.name for p in bscompile_passes(spec.kernel_family())}))
    ctx = tvm.transform.PassContext(opt_level=outer.opt_level, required_pass=list(outer.required_pass),
                                    disabled_pass=list(outer.disabled_pass), instruments=instruments,
                                    config=dict(outer.config))
    with spec.tvm_target(), ctx:
        return passes(mod)


def _check_symbolic(im: ImportedModel, spec: TargetSpec) -> None:
    """Targets whose kernels take only static shapes need every dim given (``--input-shape``)."""
    dynamic = [s for s in im.inputs if s.symbolic]
    if dynamic and not spec.kernel_family().symbolic_shapes:
        s = dynamic[0]
        raise BscompileError(f"target '{spec.name}' needs static shapes, but input '{s.name}' has symbolic dims "
                             f"{list(s.shape)}; give them with --input-shape {s.name}="
                             + ",".join(str(d) if isinstance(d, int) else "1" for d in s.shape))


def analyze_model(model, input_shapes=None, target="llvm", *, sparse: bool = True,
                  block: BlockShape | str | None = None, records=None, dump_ir=None,
                  progress: Progress | None = None) -> tuple[ImportedModel, tvm.IRModule, TargetSpec]:
    """Import and run bscompile's passes through ``ChooseLayout`` (no kernels, no build):
    what ``inspect`` reports. ``bscompile.sites.weight_entries(mod)`` lists the sites with their decisions."""
    spec = resolve_target(target)
    opts = _options(spec, sparse, block, records)
    if progress:
        progress("importing ONNX")
    im = import_onnx(model, input_shapes)
    passes = bscompile_passes(spec.kernel_family(), **opts)
    until = next(i for i, p in enumerate(passes) if p.info.name == "ChooseLayout")
    mod = _run(tvm.transform.Sequential(passes[:until + 1]), im.mod, spec, dump_ir, progress)
    return im, mod, spec


def compile(model: str | os.PathLike | onnx.ModelProto, target: str | dict | TargetSpec = "llvm", *,
            input_shapes: dict[str, tuple[int, ...]] | None = None, sparse: bool = True,
            block: BlockShape | str | None = None, cpu: str | None = None, records: dict | str | None = None,
            dump_ir=None, progress: Progress | None = None, warn_generic: bool = True) -> Artifact:
    """Compile an ONNX model (path or ModelProto) for ``target``.

    ``sparse=False`` compiles bscompile's own dense path (same kernels, every block
    present); ``block`` forces one block shape on every weight that has zeros;
    ``records`` (a path or loaded dict) applies measured choices from ``bscompile tune``;
    ``dump_ir`` (a directory) receives the IR after every pass. Products by constants that no
    site took (``manifest.extra["generic_products"]``) are logged as warnings unless ``warn_generic``
    is False (a caller compiling the same model again).
    """
    t0 = np.append(_clock(), 0.0)
    spec = resolve_target(target, cpu)
    opts = _options(spec, sparse, block, records)
    if progress:
        progress("importing ONNX")
    im = import_onnx(model, input_shapes)
    _check_symbolic(im, spec)
    t_import = np.append(_clock(), _rss_mib())
    pipeline = relax.get_pipeline("bscompile", family=spec.kernel_family(), target=spec.tvm_target(), **opts)
    relax_timer = PassTimes(depth=2)
    mod = _run(pipeline, im.mod, spec, dump_ir, progress, relax_timer)
    weights = recorded_weights(mod)
    inputs, outputs = recorded_signature(mod)
    # (absent only where the caller disabled the pass)
    generic = json.loads(str(mod.attrs[GENERIC_PRODUCTS])) if GENERIC_PRODUCTS in mod.attrs else []
    for g in generic if warn_generic else ():  # (correct, but see passes/report_generic_products.py)
        _log.warning(f"bscompile: warning: {describe(g)}, by a constant, is no weight site: TVM's generic "
                     "kernel computes it (on CPUs often 10-100x slower than a site's)")
    if progress:
        progress(f"building for {spec.name} ({len(weights)} weight sites)")
    t_relax = np.append(_clock(), _rss_mib())
    build_timer = PassTimes(depth=1)
    ctx = tvm.transform.PassContext.current()  # keep the caller's options and instruments, add the timer
    with tvm.transform.PassContext(opt_level=ctx.opt_level, config=ctx.config,
                                   instruments=[*ctx.instruments, build_timer]):
        executable = tvm.compile(mod, target=spec.tvm_target(), relax_pipeline=None)
    t_build = np.append(_clock(), _rss_mib())
    tir = build_timer.rows()
    span = lambda a, b: np.append(b[:2] - a[:2], b[2])  # noqa: E731  (wall, CPU, RSS at the end)
    rows = [("import ONNX", span(t0, t_import)), ("Relax pipeline", span(t_import, t_relax)),
            *((n[2:], t) for n, t in relax_timer.rows()[1:]),  # [0] is the pipeline itself
            ("build", span(t_relax, t_build)), *(("  " + n, t) for n, t in tir),
            ("  code generation (LLVM) and the rest",
             np.append(span(t_relax, t_build)[:2] - sum(t[:2] for _, t in tir), t_build[2]))]
    timings = [(n, round(float(t[0]), 4), round(float(t[1]), 4), round(float(t[2]), 1)) for n, t in rows]
    manifest = Manifest(
        bscompile_version=__version__, tvm_version=tvm.__version__, target_name=spec.name,
        target=spec.target, device=spec.device, arch=spec.arch, inputs=inputs, outputs=outputs,
        weights=weights, compile_seconds=round(time.perf_counter() - t0[0], 3),
        source=str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>",
        extra={"generic_products": generic} if generic else {},
    )
    if progress:
        progress(f"compiled in {manifest.compile_seconds:.1f} s")
    return Artifact(executable, manifest, spec, timings)
