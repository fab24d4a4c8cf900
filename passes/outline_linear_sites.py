"""OutlineLinearSites: every product by a constant weight matrix becomes a ``linear`` weight site.

Contract
- Input: Relax after constant folding (exporters' transposes and reshapes of
  constant weights folded away, as they insert them for ``Gemm`` and ``MatMul``).
- Output: each ``matmul(x, C)`` (relax.dpl pattern ``matmul(*, const)``) with float32
  ``x[..., K]`` (static ``K``; the other dims may be symbolic) and a 2-D float32 constant ``C[K, N]``
  (or a batch of one, ``C[1, .., 1, K, N]``, which some exporters give), and an ``add``
  of a constant bias of shape ``[N]`` that follows it, becomes
  ``reshape(site(x2d, W, b), [..., N])``: a call of a site function
  (:func:`bscompile.sites.emit_site`) on ``x2d[M, K]``, the weight in the canonical
  ``W[N, K] = C.T`` orientation, and the bias (zeros without one). Its
  ``bscompile.site`` attribute: ``kind="linear"``, ``name`` (the name the constant carries,
  :func:`bscompile.sites.const_name`: its ONNX initializer; else ``weight_<fingerprint>``),
  ``fingerprint``, ``m = M`` (an int, or the name of the site function's symbolic
  variable for it), ``shape = [N, K]``.
  An ``x`` of lower rank than such a batch of one gets the product's own shape back
  (``[1, M, N]`` for ``x[M, K]``).
- Left alone: products by run-time values, non-float32 weights, batches of several matrices,
  unknown ranks or a symbolic ``K``; existing sites. Running it twice changes nothing.
"""

from __future__ import annotations


import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from bscompile.passes.rewrite import rebind, rewrite_with_bindings
from bscompile.sites import const_array, const_name, emit_linear_site, named_const, static_k_dims


_MATMUL = is_op("relax.matmul")(wildcard(), is_const())
_BIASED = is_op("relax.add")(_MATMUL, is_const())


@relax.expr_functor.mutator
class _Outliner(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.var2val: dict = {}

    def _match(self, value: relax.Expr):
        """``(x, W[N, K] (a constant), bias | None)`` for a product by a constant weight, else None."""
        for pattern in (_BIASED, _MATMUL):
            m = pattern.extract_matched_expr(value, self.var2val)
            if m is None:
                continue
            mm = m[_MATMUL]
            x, c = mm.args
            w, xs = const_array(c), static_k_dims(x)
            if w is None or w.ndim < 2 or any(d != 1 for d in w.shape[:-2]) or w.dtype != np.float32 or not xs:
                continue
            w = w.reshape(w.shape[-2:])  # (a batch of one matrix: the same product)
            if x.ty.dtype != "float32" or xs[-1] != w.shape[0] or mm.attrs.out_dtype not in (None, "float32"):
                continue
            bias = None
            if pattern is _BIASED:
                # dpl matches add(const, matmul) too; the kernel adds its bias first, which only
                # keeps the rounding of add(matmul, const)
                bias = const_array(m[_BIASED].args[1])
                if bias is None or bias.dtype != np.float32 or bias.shape != (w.shape[1],):
                    continue
            return x, named_const(w.T, const_name(c)), bias
        return None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = self._match(binding.value)
        if found is None:
            super().visit_var_binding_(binding)
            return
        x, w, bias = found
        new = emit_linear_site(self.builder_, self.visit_expr(x), w, bias)
        out = binding.value.ty.shape
        if len(out.values) != x.ty.ndim:  # x of lower rank than a [1, K, N] weight
            new = relax.op.reshape(self.builder_.emit(new), out)
        rebind(self, binding, new)


@tvm.transform.module_pass(opt_level=0, name="OutlineLinearSites")
class OutlineLinearSites:
    """Make each product by a constant weight (and its bias) a ``linear`` site (contract: module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_with_bindings(_Outliner(mod), mod)
