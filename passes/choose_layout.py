"""ChooseLayout: pick dense or BSR (and the block shape) for every weight site.

Contract
- Input: ``plan.sites`` filled by ``AnalyzeSparsity``; the module is not changed.
- Output: every site gets a :class:`LayoutDecision` with the layout, block shape,
  kernel schedule, the cost model's estimates and a one-line reason.

Every candidate BSR shape r x c (r, c in 1..32) is costed with
:func:`codegen.cost_model.estimate_time` from its measured block count, against
the dense layout of the same kernel family. Sparse wins only when it is estimated
at least ``MARGIN`` faster, so bscompile never trades a sure dense kernel for a
marginal sparse one. ``plan.sparse=False`` (the dense path) and
``plan.force_block`` (a user override) bypass the search; tuning records
(``plan.records``, measured by :mod:`bscompile.tune`) replace it by measurement.
"""

from __future__ import annotations

import tvm

from bscompile.codegen.cpu import schedule_for
from bscompile.codegen.cost_model import KernelShape, MachineModel, estimate_time
from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BlockStats, BSRMatrix, padded
from bscompile.frontend.onnx import fingerprint
from bscompile.passes.sites import CompilePlan, LayoutDecision, WeightSite

MARGIN = 0.85


def _shape(block: BlockShape, nnzb: int, nbr: int, m: int, lanes: int, n: int, k: int,
           recurrent: bool = False) -> KernelShape:
    sched = schedule_for(block, nnzb, nbr, m, lanes, recurrent)
    return KernelShape(max(nnzb, 1), block.r, block.c, nbr, m, sched.m_tile, k, n, sched.variant, sched.m_vec)


def kernel_shape(stats: BlockStats, m: int, lanes: int, n: int, k: int, recurrent: bool = False) -> KernelShape:
    return _shape(stats.block, stats.nnz_blocks, stats.padded_shape[0] // stats.block.r, m, lanes, n, k, recurrent)


def dense_shape(n: int, k: int, m: int, lanes: int, recurrent: bool = False) -> KernelShape:
    nbr = padded(n, DENSE_ROWS) // DENSE_ROWS
    return _shape(BlockShape(DENSE_ROWS, k), nbr, nbr, m, lanes, n, k, recurrent)


def decide(site: WeightSite, plan: CompilePlan, machine: MachineModel) -> LayoutDecision:
    n, k = site.shape
    lanes = plan.vector_lanes
    recurrent = site.kind != "linear"
    t_dense = estimate_time(dense_shape(n, k, site.m, lanes, recurrent), machine)
    dense = LayoutDecision("dense", BlockShape(DENSE_ROWS, k), t_dense, t_dense, "")
    report = site.report
    if not plan.sparse:
        dense.reason = "dense path requested"
        return dense
    rec = plan.records.get(f"{fingerprint(site.weight)}:{site.m}")
    if rec is not None:
        block = BlockShape(DENSE_ROWS, k) if rec.layout == "dense" else BlockShape.parse(rec.block)
        return LayoutDecision(rec.layout, block, rec.time_us * 1e-6, rec.dense_time_us * 1e-6,
                              f"tuned: {rec.layout} {block} measured {rec.time_us:.1f} us vs dense "
                              f"{rec.dense_time_us:.1f} us", dict(rec.schedule))
    if plan.force_block is not None and report.structure != "dense":
        st = next((s for s in report.blocks if s.block == plan.force_block), None)
        t = estimate_time(kernel_shape(st, site.m, lanes, n, k, recurrent), machine) if st else t_dense
        return LayoutDecision("bsr", plan.force_block, t, t_dense, f"block {plan.force_block} forced by the user")
    best = min(report.blocks, key=lambda s: estimate_time(kernel_shape(s, site.m, lanes, n, k, recurrent), machine))
    t_best = estimate_time(kernel_shape(best, site.m, lanes, n, k, recurrent), machine)
    if t_best < MARGIN * t_dense:
        kept = best.block_density * 100
        return LayoutDecision(
            "bsr", best.block, t_best, t_dense,
            f"bsr {best.block} keeps {kept:.1f}% of blocks; est {t_best * 1e6:.1f} us vs dense "
            f"{t_dense * 1e6:.1f} us ({t_dense / t_best:.1f}x)")
    dense.reason = (f"dense: best sparse ({best.block}, {best.block_density * 100:.0f}% blocks) est "
                    f"{t_best * 1e6:.1f} us is not {1 / MARGIN:.2f}x under dense {t_dense * 1e6:.1f} us")
    return dense


def build_matrix(w, decision: LayoutDecision) -> BSRMatrix:
    if decision.layout == "dense":
        return BSRMatrix.dense(w, decision.block.r)
    return BSRMatrix.from_dense(w, decision.block)


@tvm.transform.module_pass(opt_level=0, name="ChooseLayout")
class ChooseLayout:
    def __init__(self, plan: CompilePlan, machine: MachineModel | None = None):
        self.plan = plan
        self.machine = machine or MachineModel(lanes=plan.vector_lanes)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for site in self.plan.sites:
            site.decision = decide(site, self.plan, self.machine)
        return mod
