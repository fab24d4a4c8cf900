"""FoldEmbeddingProducts: a weight site fed by rows of a constant table reads rows of the table's product.

An embedding followed by a product (``Embedding -> GRU/LSTM`` input projection,
``Embedding -> Linear``) multiplies every token's row of ``E`` by the same constant
``W``: the product of the whole table, ``E @ W.T + b``, is a constant too, and the
site becomes a gather of its rows (the bundled char GRU: a 103x768 table in place of a
768x64 product over 50 tokens a call). A dynamic site's output is a function of its
input row as well (the gate, the selection and the selected tiles all are): the gated
input product of a character LM becomes a gather too (the LSTM LM at hidden 512: a
172x2048 table in place of the gate, selection and tiles over 64 characters a call).

Contract
- Input: Relax after ``OutlineLinearSites`` (the recurrent converters' input products are
  linear sites from import).
- Output: a call of a site function of kind "linear" ``site(x2d, W, b)`` (constants ``W[N, K]``
  and ``b[N]``), or of kind "dynamic_linear" ``site(x2d, W, b, Wg, bg, alive)`` (all constants),
  whose ``x2d`` is ``take(E, idx, axis=0)`` of a constant float32 table ``E[V, K]``, seen through
  ``reshape`` and ``permute_dims`` that keep the last axis last, becomes
  ``take(E @ W.T + b, idx', axis=0)`` (a dynamic site: ``take(D, idx', axis=0)``, ``D`` its
  forward pass on every row of ``E``, :func:`codegen.dynamic_layout.dynamic_linear`), ``idx'``
  the index under the same chain without the last axis (same values, same mode, same number of
  rows: an index check of ``CheckIndices`` before it still holds). The products are summed in
  float64 and rounded once to float32 (the kernel's sums in another order; a dynamic site's gate
  scores and selection in float32, as the exported graph computes them). Site functions left
  without callers are removed.
- Left alone: tables of more than :data:`FOLD_MAX_BYTES`, tables computed at run time, gathers
  along another axis, chains that move the last axis, other site kinds, and a dynamic site whose
  selection float32 rounding could change for some row of the table: another score (a tie too)
  closer to the row's k-th largest than twice the worst-case rounding error of a float32 dot
  product of that length, in any order of summation (:func:`_float32_error`). Onnxruntime and the
  kernel might then select other tiles than the table; elsewhere every float32 evaluation selects
  the same.
  Running it twice changes nothing.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.dynamic_layout import dynamic_linear, kth_largest
from bscompile.passes.rewrite import rebind, rewrite_with_bindings
from bscompile.sites import SITE, attr, const_array, const_name, named_const

#: Largest folded table (``V x N`` float32): a vocabulary of 50k tokens times 4 gates of 1024
#: would be 800 MB of weights where the product needs 16 MB.
FOLD_MAX_BYTES = 16 << 20

_TAKE = tvm.ir.Op.get("relax.take")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _is_int(dim, value: int) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim) == value


def _ndim(expr: relax.Expr) -> int | None:
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    return None if values is None else len(values)


def _linear_table(_site: dict, table: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (table.astype(np.float64) @ w.T.astype(np.float64) + b).astype(np.float32)


def _float32_error(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A bound on ``|fl32(x @ w.T + b) - (x @ w.T + b)|`` for float32 operands, whatever the order of
    the sums (Higham, Accuracy and Stability of Numerical Algorithms, 3.1: ``gamma_n * sum |terms|``)."""
    n = x.shape[1] + 1
    eps = float(np.finfo(np.float32).eps) / 2
    gamma = n * eps / (1 - n * eps)
    return gamma * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + np.abs(b))


def _dynamic_table(site: dict, table: np.ndarray, w: np.ndarray, b: np.ndarray, gate_w: np.ndarray,
                   gate_b: np.ndarray, alive: np.ndarray) -> np.ndarray | None:
    """The dynamic site's output for every row of ``table``, or None where float32 rounding could
    change a row's selection."""
    g = np.where(alive, table.astype(np.float64) @ gate_w.T.astype(np.float64) + gate_b, -np.inf)
    kth = kth_largest(g, site["k"])[:, None]
    err = np.where(alive, _float32_error(table, gate_w, gate_b), 0).max(axis=1, keepdims=True)
    if ((np.abs(g - kth) <= 2 * err).sum(axis=1) > 1).any():  # (the k-th itself is one)
        return None
    return dynamic_linear(table, w, gate_w, gate_b, b, site["block"], site["k"], alive)[0]


#: The product of a whole table, per site kind: ``(site, table, W, *other operands) -> table or None``.
_PRODUCTS = {"linear": _linear_table, "dynamic_linear": _dynamic_table}


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.var2val: dict = {}

    def _value(self, expr: relax.Expr) -> relax.Expr:
        return self.var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def _gather_chain(self, x: relax.Expr, k: int):
        """``(take, [reshape | permute_dims calls from the take to x])`` when ``x`` is rows of a
        constant table under ops that keep its last axis (``k`` wide) last, else None."""
        ops = []
        value = self._value(x)
        while isinstance(value, relax.Call) and value.op in (_RESHAPE, _PERMUTE):
            src, n = value.args[0], _ndim(value.args[0])
            if value.op.same_as(_PERMUTE):
                axes = value.attrs.axes
                if axes is None or n is None or int(axes[-1]) != n - 1:
                    return None
            elif not isinstance(value.args[1], relax.ShapeExpr) or not _is_int(value.args[1].values[-1], k):
                return None  # (each op keeps the last dim at k: so does the reshaped input)
            ops.append(value)
            value = self._value(src)
        if not (isinstance(value, relax.Call) and value.op.same_as(_TAKE) and int(value.attrs.axis) == 0):
            return None
        return value, ops[::-1]

    def _fold(self, call: relax.Call):
        """The gather replacing a linear or dynamic site call, or None."""
        if not isinstance(call.op, tvm.ir.GlobalVar) or call.op not in self.mod.functions:
            return None
        site = attr(self.mod[call.op], SITE)
        if site is None or site["kind"] not in _PRODUCTS:
            return None
        x, w_expr, *params = call.args
        w, params = const_array(w_expr), [const_array(p) for p in params]
        if w is None or any(p is None for p in params):
            return None
        found = self._gather_chain(x, w.shape[1])
        table = const_array(found[0].args[0]) if found else None
        if table is None or table.dtype != np.float32 or table.ndim != 2 or table.shape[1] != w.shape[1] \
                or table.shape[0] * w.shape[0] * 4 > FOLD_MAX_BYTES:
            return None
        folded = _PRODUCTS[site["kind"]](site, table, w, *params)
        if folded is None:
            return None
        take, ops = found
        name = const_name(w_expr)
        # the chain moves only the index axes: apply it to the index (a few integers), not to the
        # gathered rows (a transpose of [1, 50, 768] cost the char GRU 8 us)
        bb = self.builder_
        idx = self.visit_expr(take.args[1])
        for op in ops:
            if op.op.same_as(_PERMUTE):
                idx = bb.emit(relax.op.permute_dims(idx, [int(a) for a in op.attrs.axes][:-1]))
            else:
                idx = bb.emit(relax.op.reshape(idx, op.args[1].values[:-1]))
        table_name = name and f"{name}*{const_name(take.args[0]) or 'table'}"
        return relax.op.take(named_const(folded, table_name), idx, axis=0, mode=take.attrs.mode)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self._fold(binding.value) if isinstance(binding.value, relax.Call) else None
        if new is None:
            super().visit_var_binding_(binding)
        else:
            rebind(self, binding, new)


@tvm.transform.module_pass(opt_level=0, name="FoldEmbeddingProducts")
class FoldEmbeddingProducts:
    """Replace a product of rows of a constant table by rows of the table's product (contract: module
    docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_with_bindings(_Folder(mod), mod)
