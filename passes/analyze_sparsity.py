"""AnalyzeSparsity: collect every weight site and measure its sparsity structure.

Contract
- Input: a module whose weight uses are site calls (after ``OutlineLinearSites``).
- Output: the same program; each analysed site call gets a callee of its own whose
  site attribute carries ``site_index``, its index in ``plan.sites``. ``plan.sites`` gets one :class:`WeightSite` per site
  call whose matrix arguments are constants, in program order, each with a
  :class:`SparsityReport`: overall density, and for every candidate block shape
  r x c (r, c in 1..32) the fraction of all-zero blocks and the zero padding the
  shape needs when it does not divide the matrix.

Block-structure detection: the structure a pruner produced is the largest block
shape whose occupied blocks are (almost) entirely non-zero, i.e. the non-zeros fill
at least ``FILL`` of the values that layout stores. A 4x4-pruned matrix fills 4x4
blocks but not 8x8 ones (unless the pruned pattern happens to be 8x8-aligned), and
an unstructured one fills nothing larger than 1x1.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.layout import BlockShape, all_block_stats
from bscompile.frontend.onnx import fingerprint
from bscompile.passes.sites import rewrite_relax_functions, SITE_ATTR, CompilePlan, SparsityReport, WeightSite, decode_matrix, site_attr, site_matrices

FILL = 0.95


def analyze(w: np.ndarray) -> SparsityReport:
    nnz = int(np.count_nonzero(w))
    density = nnz / max(w.size, 1)
    stats = all_block_stats(w)
    if nnz == 0:
        return SparsityReport(w.shape, 0.0, stats, "all-zero", None)
    if density >= 0.99:
        return SparsityReport(w.shape, density, stats, "dense", None)
    # Fill is measured on the matrix, not its padding, so edge blocks of a shape that
    # does not divide the matrix do not count against it.
    filled = [s for s in stats if nnz / _stored_unpadded(s, w.shape) >= FILL]
    best = max(filled, key=lambda s: (s.block.r * s.block.c, s.block.r), default=None)
    if best is None or best.block == BlockShape(1, 1):
        return SparsityReport(w.shape, density, stats, "unstructured", BlockShape(1, 1))
    return SparsityReport(w.shape, density, stats, f"block {best.block}", best.block)


def _stored_unpadded(s, shape) -> float:
    """Values the occupied blocks cover inside the matrix (edge blocks clipped)."""
    r, c = s.block.r, s.block.c
    n, k = shape
    full_frac = (n / s.padded_shape[0]) * (k / s.padded_shape[1])
    return max(s.nnz_blocks * r * c * full_frac, 1.0)


@relax.expr_functor.mutator
class _Collector(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: CompilePlan):
        super().__init__(mod)
        self.mod, self.plan = mod, plan

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        attrs = site_attr(self.mod, call)
        if attrs is None:
            return call
        site = self._collect(call, attrs)
        if site is None:
            return call
        attrs["site_index"] = site.index
        func = self.mod[call.args[0]].with_attr(SITE_ATTR, json.dumps(attrs))
        gv = self.builder_.add_func(func, f"{call.args[0].name_hint}_{site.index}")
        return relax.Call(call.op, [gv, *call.args[1:]], call.attrs, call.ty_args)

    def _collect(self, call: relax.Call, attrs: dict) -> WeightSite | None:
        args = list(call.args[1].fields)
        parts = []
        for pos, shape, _ in site_matrices(attrs):
            w = decode_matrix(args, pos, shape)
            if w is None:
                return None  # weight computed at run time: stays as imported
            parts.append(w)
        w = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        name = self.plan.weight_names.get(fingerprint(w)) or attrs.get("weight") or f"weight_{len(self.plan.sites)}"
        m = attrs["m"] if attrs["kind"] == "linear" else attrs["batch"]
        site = WeightSite(len(self.plan.sites), attrs["kind"], name, w, m, attrs)
        site.report = analyze(w)
        self.plan.sites.append(site)
        return site


@tvm.transform.module_pass(opt_level=0, name="AnalyzeSparsity")
class AnalyzeSparsity:
    def __init__(self, plan: CompilePlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.plan.sites.clear()
        collector = _Collector(mod, self.plan)
        return relax.transform.DeadCodeElimination()(rewrite_relax_functions(collector, mod))
