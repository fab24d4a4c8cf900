"""LowerWeightSites: replace every analysed site by the kernel generated for its layout.

Contract
- Input: sites tagged with ``site_index`` (``AnalyzeSparsity``) and decided
  (``ChooseLayout``).
- Output: each site call invokes a freshly generated kernel for its decision --
  the target's kernel family (``plan.kernels``, :mod:`codegen.family`) on the
  chosen BSR / dense layout -- with the layout's data, indices and row pointers as
  constants and the bias re-padded to the layout's row count. The decision's
  ``schedule`` and the site's ``stored_bytes`` are recorded in the plan.
  Numerics are unchanged up to float reassociation.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.layout import BSRMatrix
from bscompile.codegen.recurrent_cells import CellSpec
from bscompile.passes.choose_layout import build_matrix
from bscompile.passes.sites import rewrite_relax_functions, SITE_ATTR, CompilePlan, WeightSite, const_array, site_attr, site_matrices


def _repad_bias(bb: relax.BlockBuilder, bias: relax.Expr, n: int, n_pad: int) -> relax.Expr:
    arr = const_array(bias)
    if arr is not None:
        out = np.zeros(n_pad, np.float32)
        out[:n] = arr[:n]
        return relax.const(out)
    b = bb.emit(relax.op.strided_slice(bias, [0], [0], [n]))
    return b if n_pad == n else bb.emit(relax.op.nn.pad(b, [0, n_pad - n]))


def _schedule(site: WeightSite, mat: BSRMatrix, plan: CompilePlan):
    tuned = site.decision.schedule
    if tuned:
        return plan.kernels.schedule_from_json(tuned)
    return plan.kernels.default_schedule(mat, site.m, plan.vector_lanes, recurrent=site.kind != "linear")


@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: CompilePlan):
        super().__init__(mod)
        self.mod, self.plan = mod, plan

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        attrs = site_attr(self.mod, call)
        if attrs is None or "site_index" not in attrs:
            return call
        site = self.plan.sites[attrs["site_index"]]
        args = list(call.args[1].fields)
        mats, scheds = [], []
        for pos, (rows, _), row0 in site_matrices(attrs):
            mat = build_matrix(site.weight[row0:row0 + rows], site.decision)
            sched = _schedule(site, mat, self.plan)
            args[pos:pos + 4] = [relax.const(mat.data), relax.const(mat.indices), relax.const(mat.indptr),
                                 _repad_bias(self.builder_, args[pos + 3], rows, mat.padded_shape[0])]
            mats.append(mat)
            scheds.append(sched)
        if site.kind == "linear":
            func = self.plan.kernels.linear(mats[0], site.m, scheds[0])
        else:
            func = self.plan.kernels.recurrent(CellSpec.from_json(attrs["cell"]), mats, attrs["seq"], attrs["batch"], scheds)
        site.decision.schedule = scheds[0].to_json()
        site.attrs["stored_bytes"] = sum(m.nbytes for m in mats)
        attrs["layout"] = site.decision.to_json()
        func = func.with_attr(SITE_ATTR, json.dumps(attrs))
        gv = self.builder_.add_func(func, f"{site.kind}_{site.decision.layout}_{site.index}")
        return relax.Call(call.op, [gv, relax.Tuple(args)], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="LowerWeightSites")
class LowerWeightSites:
    def __init__(self, plan: CompilePlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        lowerer = _Lowerer(mod, self.plan)
        return relax.transform.DeadCodeElimination()(rewrite_relax_functions(lowerer, mod))
