"""OutlineLinearSites: every ``matmul`` by a constant weight becomes a linear weight site.

Contract
- Input: a Relax module after constant folding (transposes/reshapes of constant
  weights folded, as exporters insert them for ``Gemm`` and ``MatMul``).
- Output: each ``matmul(x, C)`` with float32 ``x[..., K]`` of static shape and a
  2-D constant ``C[K, N]`` is replaced by ``reshape(call_tir(kernel, [x2d, data,
  indices, indptr, bias]), [..., N])``, where ``kernel`` is the dense-layout
  kernel (:func:`codegen.cpu.linear_kernel` on :meth:`BSRMatrix.dense`) tagged as
  a ``linear`` site. A following ``add`` of a constant bias of shape ``[N]`` is
  folded into the kernel. Numerics are unchanged; other matmuls are left alone.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.cpu import default_schedule, linear_kernel
from bscompile.codegen.layout import DENSE_ROWS, BSRMatrix
from bscompile.passes.sites import rewrite_relax_functions, SITE_ATTR, const_array

_MATMUL = tvm.ir.Op.get("relax.matmul")
_ADD = tvm.ir.Op.get("relax.add")


def _static(expr) -> tuple[int, ...] | None:
    try:
        return tuple(int(v) for v in expr.ty.shape.values)
    except (TypeError, AttributeError):
        return None


def emit_linear_site(bb: relax.BlockBuilder, x: relax.Expr, w: np.ndarray, bias: np.ndarray | None,
                     name_hint: str = "linear") -> relax.Expr:
    """Emit ``x @ w.T + bias`` as a dense-layout linear site; ``x`` is ``[..., K]``."""
    shape = _static(x)
    n, k = w.shape
    m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    mat = BSRMatrix.dense(w, DENSE_ROWS)
    func = linear_kernel(mat, m, default_schedule(mat, m))
    site = {"kind": "linear", "shape": [n, k], "m": m}
    gv = bb.add_func(func.with_attr(SITE_ATTR, json.dumps(site)), name_hint)
    n_pad = mat.padded_shape[0]
    b = np.zeros(n_pad, np.float32)
    if bias is not None:
        b[:n] = bias
    x2d = bb.emit(relax.op.reshape(x, [m, k])) if len(shape) != 2 else x
    y = bb.emit(relax.call_tir(gv, [x2d, relax.const(mat.data), relax.const(mat.indices),
                                    relax.const(mat.indptr), relax.const(b)],
                               relax.TensorType((m, n), "float32")))
    return relax.op.reshape(y, [*shape[:-1], n]) if len(shape) != 2 else y


@relax.expr_functor.mutator
class _Outliner(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.var2val: dict = {}  # bindings of the function being visited

    def _linear_operands(self, call: relax.Call):
        if not (isinstance(call, relax.Call) and call.op.same_as(_MATMUL)):
            return None
        x, c = call.args
        w = const_array(c)
        xs = _static(x)
        if w is None or w.ndim != 2 or w.dtype != np.float32 or xs is None or len(xs) < 1:
            return None
        if x.ty.dtype != "float32" or xs[-1] != w.shape[0]:
            return None
        return x, np.ascontiguousarray(w.T)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        ops = self._linear_operands(value)
        if ops is None and isinstance(value, relax.Call) and value.op.same_as(_ADD):
            ops = self._bias_add(value)
        if ops is None:
            super().visit_var_binding_(binding)
            return
        x, w, bias = ops if len(ops) == 3 else (*ops, None)
        x = self.visit_expr(x)
        new = emit_linear_site(self.builder_, x, w, bias)
        self.set_var_remap(binding.var, self.builder_.emit(new, name_hint=binding.var.name))

    def _bias_add(self, add: relax.Call):
        lhs, rhs = add.args
        bias = const_array(rhs)
        if not isinstance(lhs, relax.Var) or bias is None:
            return None
        ops = self._linear_operands(self.var2val.get(lhs))
        if ops is None or bias.dtype != np.float32:
            return None
        n = ops[1].shape[0]
        if bias.size != n or bias.shape[-1:] != (n,):
            return None
        return (*ops, bias.reshape(n))


@tvm.transform.module_pass(opt_level=0, name="OutlineLinearSites")
class OutlineLinearSites:
    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        outliner = _Outliner(mod)
        def index(func):
            outliner.var2val = relax.analysis.get_var2val(func)

        return relax.transform.DeadCodeElimination()(rewrite_relax_functions(outliner, mod, index))
