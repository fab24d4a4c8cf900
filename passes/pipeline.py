"""The ``bscompile`` pipeline: bscompile's passes, then TVM's lowering for the target.

Registered with ``relax.register_pipeline("bscompile")``, so it is one named
``tvm.transform.Pass`` like TVM's own pipelines::

    FoldConstant, DeadCodeElimination   weights become plain constants
    CheckIndices(raises)                data-dependent indices range-checked at run time (clamped
                                        where the family's kernels cannot raise)
    Conv1dToMatmul                      a convolution by a constant kernel -> im2col + matmul
    OutlineDynamicSites(family)         input-dependent block selection -> dynamic sites
    FuseDynamicRecurrences(family)      a loop whose body is a gated LSTM/GRU cell -> one
                                        dynamic_recurrent site (the time loop in its kernel)
    OutlineLinearSites                  products by constant weights -> linear sites
                                        (recurrent sites come from the frontend)
    FoldEmbeddingProducts               a linear or dynamic site fed by rows of a constant table
                                        -> a gather from the table's product
    AnalyzeSparsity                     bscompile.sparsity on every constant-weight site
    ChooseLayout(family, ...)           bscompile.layout on every site
    LowerWeightSites(family)            sites -> the family's kernels, packed constants
    FoldConstant, DeadCodeElimination   what lowering left foldable
    OwnOutputs                          no returned array aliases an input, a constant or another output
    ReportGenericProducts               products by constants no site took (TVM's slow generic
                                        kernels compute them), recorded for the driver's warning
    TVM's lowering for the target       (CPU: relax "default" with FuseLoopKernels after
                                        FuseTIR -- a real loop whose step is PrimFuncs -> one
                                        kernel; CUDA: the CUDA pipeline with dlight for the
                                        remaining ops)
    RecordWeights                       bscompile.weights: the manifest's weight entries, in
                                        program order (a fused loop's sites included)
    ShareIdenticalKernels               sites' kernels with the same code merged (built once)

Every pass reads and writes the IR only. IR dumps are a pass instrument
(``tvm.ir.instrument.DumpIR`` in a ``PassContext``), so they show the IR after every
pass, TVM's included.
"""

from __future__ import annotations

from typing import Mapping

import tvm
from tvm import relax

from bscompile.codegen.family import KernelFamily
from bscompile.codegen.layout import BlockShape
from bscompile.passes.analyze_sparsity import AnalyzeSparsity
from bscompile.passes.check_indices import CheckIndices
from bscompile.passes.choose_layout import ChooseLayout
from bscompile.passes.conv1d_to_matmul import Conv1dToMatmul
from bscompile.passes.fold_embedding_products import FoldEmbeddingProducts
from bscompile.passes.fuse_dynamic_recurrences import FuseDynamicRecurrences
from bscompile.passes.fuse_loop_kernels import FuseLoopKernels
from bscompile.passes.lower_weight_sites import LowerWeightSites
from bscompile.passes.outline_dynamic_sites import OutlineDynamicSites
from bscompile.passes.outline_linear_sites import OutlineLinearSites
from bscompile.passes.own_outputs import OwnOutputs
from bscompile.passes.record_weights import RecordWeights
from bscompile.passes.report_generic_products import ReportGenericProducts
from bscompile.passes.share_identical_kernels import ShareIdenticalKernels
from bscompile.records import TuningRecord


def bscompile_passes(family: KernelFamily, *, sparse: bool = True, force_block: BlockShape | None = None,
                     records: Mapping[str, TuningRecord] | None = None) -> list[tvm.transform.Pass]:
    """bscompile's own passes, in order (without TVM's lowering)."""
    return [
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
        CheckIndices(raises=family.raises),
        Conv1dToMatmul(),
        OutlineDynamicSites(family),
        FuseDynamicRecurrences(family),
        OutlineLinearSites(),
        FoldEmbeddingProducts(),
        AnalyzeSparsity(),
        ChooseLayout(family, sparse=sparse, force_block=force_block, records=records),
        LowerWeightSites(family),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
        OwnOutputs(copied=family.copies_outputs),
        ReportGenericProducts(),
    ]


def tvm_lowering(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's Relax lowering for ``target``: its default pipeline for the target kind, which
    fuses the generic ops (FuseOps/FuseTIR: a cell's elementwise tail is one kernel, not one
    kernel and one allocation per op); site kernels are opaque to fusion. On LLVM CPUs,
    :class:`FuseLoopKernels` runs after FuseTIR (it needs every op to be a PrimFunc)."""
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    cpu = relax.backend.cpu_generic.pipeline

    @tvm.transform.module_pass(opt_level=0, name="cpu_lowering")
    def lower(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [FuseLoopKernels()]
                + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    return lower


@relax.register_pipeline("bscompile")
def bscompile_pipeline(family: KernelFamily, target: tvm.target.Target, **options) -> tvm.transform.Pass:
    """bscompile's passes then TVM's lowering: the whole Relax pipeline of ``bscompile.compile``.

    ``options``: ``sparse``, ``force_block``, ``records`` (see :class:`ChooseLayout`).
    Run it inside ``with target:`` (TVM's lowering reads the current target).
    """
    return tvm.transform.Sequential([*bscompile_passes(family, **options), tvm_lowering(target), RecordWeights(),
                                     ShareIdenticalKernels()], name="bscompile")
