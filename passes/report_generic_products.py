"""ReportGenericProducts: products by constant weights that no site took, recorded for a warning.

A product by a constant weight that no bscompile pass proved to be a weight site stays on
TVM's generic path: correct, but TVM's unscheduled CPU kernels are one to two orders of
magnitude slower than the site kernels (``x[64, 64] @ C[1, 64, 2048]``: 23.9 ms a call
against 196 us as a site). The user should hear of it at compile time, not from a profile.

Contract
- Input: Relax after bscompile's passes (sites outlined and lowered), before TVM's lowering.
- Output: the same module with the attribute ``bscompile.generic_products``
  (:data:`GENERIC_PRODUCTS`): the JSON text of a list of the ``matmul``, ``einsum`` and
  convolution (``conv1d/2d/3d`` and their transposes) calls -- also as the ``call_tir`` of a
  kernel of that name, as TVM's ONNX frontend emits ``Einsum`` -- of any Relax function with a
  constant operand (inline, or a variable bound to a constant through layout ops: FoldConstant
  leaves those outside dataflow blocks), one entry per distinct ``{"op", "function", "shapes"}``
  (the operands' shapes, a symbolic dim by its name) with its ``count`` (a product in an unrolled
  loop is one entry), in order of first appearance. An empty list when there is none. Nothing
  else changes; running it again records the same list.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from bscompile.sites import dim_of, shape_text

#: The module attribute: JSON list of the generic products (read by the driver).
GENERIC_PRODUCTS = "bscompile.generic_products"

_PRODUCTS = {tvm.ir.Op.get(f"relax.{name}"): name.removeprefix("nn.")
             for name in ("matmul", "einsum", "nn.conv1d", "nn.conv2d", "nn.conv3d", "nn.conv1d_transpose",
                          "nn.conv2d_transpose", "nn.conv3d_transpose")}
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_LAYOUT = [tvm.ir.Op.get(f"relax.{name}") for name in ("permute_dims", "reshape", "astype", "expand_dims", "squeeze")]


def _dims(e: relax.Expr) -> list[int | str] | None:
    values = getattr(getattr(e.ty, "shape", None), "values", None)
    return None if values is None else [dim_of(v) for v in values]


def _product(call: relax.Call) -> tuple[str, list[relax.Expr]] | None:
    """(op name, operands) of a product op, or of the ``call_tir`` of a kernel named for one
    (TVM's ONNX frontend emits ``Einsum`` as ``call_tir(einsum, ...)`` of a TE kernel)."""
    if call.op in _PRODUCTS:
        args = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else call.args  # (einsum: a tuple)
        return _PRODUCTS[call.op], list(args)
    if call.op.same_as(_CALL_TIR) and isinstance(call.args[0], relax.GlobalVar):
        name = call.args[0].name_hint.rstrip("0123456789")
        if name in _PRODUCTS.values():
            return name, list(call.args[1].fields)
    return None


def _constant(e: relax.Expr, var2val) -> bool:
    """Whether ``e`` is a constant, also through variables and layout ops (outside dataflow blocks,
    as in an ``If``'s branches, FoldConstant leaves ``v = permute_dims(const)`` bound)."""
    while True:
        if isinstance(e, tvm.ir.expr.Constant):
            return True
        if isinstance(e, relax.Var) and e in var2val:
            e = var2val[e]
        elif isinstance(e, relax.Call) and any(e.op.same_as(op) for op in _LAYOUT):
            e = e.args[0]
        else:
            return False


def generic_products(mod: tvm.IRModule) -> list[dict]:
    """The entries of :data:`GENERIC_PRODUCTS` for ``mod`` (see the module docstring)."""
    found: dict[str, dict] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        var2val = relax.analysis.get_var2val(func)

        def visit(e, name=gv.name_hint):
            product = _product(e) if isinstance(e, relax.Call) else None
            if product is not None and any(_constant(a, var2val) for a in product[1]):
                entry = {"op": product[0], "function": name, "shapes": [_dims(a) for a in product[1]]}
                found.setdefault(json.dumps(entry), dict(entry, count=0))["count"] += 1

        relax.analysis.post_order_visit(func.body, visit)
    return list(found.values())


def describe(entry: dict) -> str:
    """One entry in words: ``matmul of [T, 64] and [2, 64, 2048] in main (x20)``."""
    shapes = " and ".join(shape_text(d) if d is not None else "[?]" for d in entry["shapes"])
    count = entry.get("count", 1)
    return f"{entry['op']} of {shapes} in {entry['function']}" + (f" (x{count})" if count > 1 else "")


@tvm.transform.module_pass(opt_level=0, name="ReportGenericProducts")
class ReportGenericProducts:
    """Record the products by constants left to TVM's generic kernels (contract: module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return mod.with_attr(GENERIC_PRODUCTS, json.dumps(generic_products(mod)))
