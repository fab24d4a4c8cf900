"""ShareIdenticalKernels: one kernel for the sites that generated the same code.

Stacked and bidirectional layers of one size and sparsity get the same generated kernel
(the generators are cached by their parameters), but each site's kernel carries its own
attributes (the site, its layout decision, its sparsity), so each was compiled by LLVM
on its own (LLVM's time grows with the number of functions: 0.3 s per copy of a
dynamic-linear kernel, build and object code); the hidden-2560 DeepSpeech-like model
had 14 site kernels, 7 of them copies.

Contract
- Input: a module after bscompile's pipeline whose weight entries are recorded
  (``RecordWeights``): the pass drops the site attributes of the kernels it merges, so it
  runs last, after TVM's lowering (the last pass of the ``bscompile`` pipeline).
- TIR PrimFuncs carrying ``bscompile.site`` that are structurally equal once the
  site's attributes (``bscompile.site``, ``bscompile.layout``, ``bscompile.sparsity``)
  and ``global_symbol`` are set aside are merged into the first of them (in the module's
  order of names); every reference in a Relax function to a merged one (``call_tir``
  or, after the VM lowering, a direct call) is redirected to it.
- Left alone: PrimFuncs without a site (TVM's own fused operators), kernels that
  differ in anything else (shape, schedule, target), and a module with no duplicates
  comes back as it was.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from bscompile.sites import LAYOUT, SITE, SPARSITY

_OWN_ATTRS = (SITE, LAYOUT, SPARSITY, "global_symbol")


def _code(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    for key in _OWN_ATTRS:
        if func.attrs is not None and key in func.attrs:
            func = func.without_attr(key)
    return func


@relax.expr_functor.mutator
class _Redirect(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, to: dict):
        super().__init__(mod)
        self.to = to

    def visit_global_var_(self, gv: tvm.ir.GlobalVar) -> relax.Expr:
        return self.to.get(gv, gv)


@tvm.transform.module_pass(opt_level=0, name="ShareIdenticalKernels")
class ShareIdenticalKernels:
    """Merge site kernels whose code is the same (contract: module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kept: dict[int, list[tuple[tvm.ir.GlobalVar, tvm.tirx.PrimFunc]]] = {}
        to: dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar] = {}
        for gv in sorted(mod.functions, key=lambda g: g.name_hint):
            func = mod[gv]
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or SITE not in func.attrs:
                continue
            code = _code(func)
            same = kept.setdefault(tvm_ffi.structural_hash(code), [])
            twin = next((g for g, c in same if tvm_ffi.structural_equal(c, code)), None)
            if twin is None:
                same.append((gv, code))
            else:
                to[gv] = twin
        if not to:
            return mod
        out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in to}, attrs=mod.attrs,
                           global_infos=mod.global_infos)
        redirect = _Redirect(out, to)
        for gv, func in list(out.functions.items()):
            if isinstance(func, relax.Function):
                out[gv] = redirect.visit_expr(func)
        return out
