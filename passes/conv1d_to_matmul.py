"""Conv1dToMatmul: a 1-D convolution by a constant kernel becomes im2col + matmul.

Contract
- Input: Relax with ``nn.conv1d`` (NCW data, OIW kernel, groups 1, dilation 1) whose
  weight is a constant and whose input has a static channel count (batch and length
  may be symbolic).
- Output: ``x_pad`` is cut into the ``k`` strided windows a kernel tap reads,
  stacked to ``[B, T_out, C*k]`` columns and multiplied by the constant
  ``W.reshape(O, C*k).T``; the result is laid out back as ``[B, O, T_out]``.
  Numerics are unchanged. Run before ``OutlineLinearSites``, which turns the matmul
  into a weight site: the convolution then runs on bscompile's scheduled (and,
  for a pruned kernel, block-sparse) linear kernels instead of TVM's unscheduled,
  single-threaded default.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from bscompile.passes.rewrite import rewrite_relax_functions
from bscompile.sites import const_array, const_name, named_const

_CONV1D = tvm.ir.Op.get("relax.nn.conv1d")


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_CONV1D):
            return call
        x, w_expr = call.args
        w = const_array(w_expr)
        a = call.attrs
        values = getattr(getattr(x.ty, "shape", None), "values", None)
        if values is None or len(values) != 3 or not isinstance(values[1], tvm.tirx.IntImm):
            return call
        b, c, t = (int(v) if isinstance(v, tvm.tirx.IntImm) else v for v in values)
        if (w is None or w.dtype != np.float32 or a.groups != 1 or tuple(a.dilation) != (1,)
                or a.data_layout != "NCW" or a.kernel_layout != "OIW" or a.out_layout != "NCW"):
            return call
        o, _, k = w.shape
        (s,), (p0, p1) = tuple(int(v) for v in a.strides), tuple(int(v) for v in a.padding)
        t_out = (t + p0 + p1 - k) // s + 1
        bb = self.builder_
        xp = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, p0, p1])) if p0 or p1 else x
        taps = [bb.emit(relax.op.strided_slice(xp, [2], [j], [j + s * (t_out - 1) + 1], [s], assume_inbound=True))
                for j in range(k)]  # (in bounds by construction; lets Relax see equal lengths)
        cols = bb.emit(relax.op.stack(taps, axis=3))  # [B, C, T_out, k]
        cols = bb.emit(relax.op.permute_dims(cols, [0, 2, 1, 3]))  # [B, T_out, C, k]
        cols = bb.emit(relax.op.reshape(cols, [b, t_out, c * k]))
        w_mat = named_const(w.reshape(o, c * k).T, const_name(w_expr))  # the kernel's name goes with it
        y = bb.emit(relax.op.matmul(cols, w_mat))  # [B, T_out, O]
        return relax.op.permute_dims(y, [0, 2, 1])


@tvm.transform.module_pass(opt_level=0, name="Conv1dToMatmul")
class Conv1dToMatmul:
    """Turn a 1-D convolution by a constant kernel into im2col + matmul, a product a site can take (contract:
    module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(_Rewriter(mod), mod)
