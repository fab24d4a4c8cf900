"""FuseDynamicRecurrences: a real loop whose body is a gated LSTM or GRU cell becomes one recurrent site.

Contract
- Input: Relax after ``OutlineDynamicSites``, holding the real loops the frontend makes of
  an ONNX ``Scan`` / ``Loop`` of symbolic length (:mod:`bscompile.frontend.loops`): a call
  ``loop_chunks(0, n, *carried, *per_step_inputs, *invariants, *scan_buffers)`` of a
  function with the ``bscompile.loop`` attribute, which runs ``loop_step(t, n-1-t, ...)``
  ``n`` times. Its step is examined as an expression over the step's parameters: a
  ``dynamic_linear`` site on the carried ``h`` (static batch, constant operands), row ``t``
  of a ``[n, B, G*H]`` value ``xp`` (the input product of every step; any index that is
  ``t`` after the frontend's range check and negative-index wrap), slices of ``H``
  columns of ``xp[t] + site(h)`` or of each, ``sigmoid``, ``tanh``, ``add``,
  ``multiply``, ``negative``, ``subtract`` (as adding a negation), constants; reshapes and slices that change nothing are looked through,
  commutative operands compared in any order.
- Output: when the step is PyTorch's LSTM cell (``c' = σ(f) c + σ(i) tanh(g)``,
  ``h' = σ(o) tanh(c')``, any order of the four gates' columns) or GRU cell
  (``n = tanh(x_n + r (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``, any order of three),
  carrying ``h`` (and ``c``) and emitting ``h'`` as every scan output (forward), the call
  becomes one ``dynamic_recurrent`` site on ``[xp, h0, c0, W_hh, b_hh, Wg, bg, alive]``
  (a GRU passes ``h0`` as ``c0``) returning ``(y[n, B, H], h_n, c_n)``, and the loop's
  results are read from it. The site attribute is the dynamic site's (``block``, ``k``,
  ``n_alive``, ``keep``, ...) with ``m`` the batch, ``seq`` the loop length and ``cell``
  (:class:`codegen.recurrent_cells.CellSpec` with its ``gate_order``). Its kernels read the
  dynamic site's tile layout. Numerics: the same products and cell, reassociated.
- Left alone (the loop runs as it was, correctly): any other body (peepholes, layer norm,
  other activations, a cell on a static product, reversed scans), a symbolic batch, and
  every loop on a target whose family has no ``dynamic_recurrent`` generator. Idempotent.

Matching: by a canonical form of the step's expression tree, not ``relax.dpl`` patterns. The
cell is one of ``4!`` (LSTM) or ``3!`` (GRU) gate orders over column slices whose offsets must
agree with each other, with operands in any order under ``add``/``multiply`` and a negation
taken as a subtraction: as dpl patterns that is one pattern per order plus offset checks in
predicates; the canonical tree compares the orders directly (``match_cell``).
"""

from __future__ import annotations

import itertools
from typing import Any

import tvm
import tvm_ffi
from tvm import relax

from bscompile.codegen.family import KernelFamily
from bscompile.codegen.recurrent_cells import CellSpec
from bscompile.passes.outline_dynamic_sites import DYNAMIC, int_values
from bscompile.passes.rewrite import rebind, rewrite_with_bindings
from bscompile.sites import LOOP, SITE, Matrix, SiteKind, attr, const_array, emit_site, expr_dims, register_site_kind


def _pack(site: dict, operands, layout: dict, schedules) -> tuple[list[relax.Expr], int]:
    """``[xp, h0, c0, tiles, gate_w, gate_b, bias]``: the dynamic site's packing of ``W_hh``."""
    xp, h0, c0, *product = operands
    args, stored = DYNAMIC.pack(site, [h0, *product], layout, schedules)
    return [xp, h0, c0, *args[1:]], stored


#: Operands ``[xp, h0, c0, W_hh, b_hh, Wg, bg, alive]``; outputs ``(y, h_n, c_n)``.
DYNAMIC_RECURRENT = register_site_kind(SiteKind("dynamic_recurrent", lambda site: [Matrix(3, 4)],
                                                fixed_layout="tiles", pack=_pack))

_UNARY = {"relax.sigmoid": "sigmoid", "relax.tanh": "tanh", "relax.negative": "neg"}
_COMMUTATIVE = {"relax.add": "add", "relax.multiply": "mul"}


def _flat(tag: str, terms) -> tuple:
    """A sum or product with nested ones of the same kind flattened, terms in a canonical order."""
    flat = [u for t in terms for u in (t[1:] if t[0] == tag else (t,))]
    return (tag, *sorted(flat, key=repr))


def _add(*terms):
    return _flat("add", terms)


def _mul(*terms):
    return _flat("mul", terms)


def _slice(lo: int, hi: int, v):
    """Columns ``[lo, hi)`` of ``v``, pushed through sums (a slice of ``xp[t] + site(h)`` is the
    sum of the slices)."""
    if v[0] == "add":
        return _add(*(_slice(lo, hi, a) for a in v[1:]))
    return ("slice", lo, hi, v)


class _Step:
    """The step function as canonical expression trees (tuples) over its parameters:
    ``("p", i)`` parameter i, ``("row", e)`` row t of e, ``("site", e)`` the dynamic site on e."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        self.mod = mod
        self.val = relax.analysis.get_var2val(func)
        self.params = {p: i for i, p in enumerate(func.params)}
        self.t = func.params[0]
        self.sites: list[tuple[dict, relax.Call]] = []

    def is_t(self, e) -> bool:
        """``t``, also through the frontend's range check and negative-index wrap (``t >= 0``)."""
        e = self.val.get(e, e)
        if e.same_as(self.t):
            return True
        if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir"):
            return self.is_t(e.args[1].fields[0])
        if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.where"):
            cond = self.val.get(e.args[0], e.args[0])
            return (isinstance(cond, relax.Call) and cond.op == tvm.ir.Op.get("relax.less")
                    and self.is_t(cond.args[0]) and _is_zero(cond.args[1]) and self.is_t(e.args[2]))
        return False

    def canon(self, e) -> Any:
        if isinstance(e, relax.Var):
            if e in self.params:
                return ("p", self.params[e])
            return self.canon(self.val[e]) if e in self.val else None
        if isinstance(e, tvm.ir.expr.Constant):
            arr = const_array(e)
            return ("c", float(arr)) if arr is not None and arr.size == 1 and arr.ndim == 0 else None
        if not isinstance(e, relax.Call):
            return None
        if isinstance(e.op, tvm.ir.GlobalVar):
            site = attr(self.mod[e.op], SITE) if e.op in self.mod.functions else None
            if site is None or site["kind"] != DYNAMIC.name:
                return None
            self.sites.append((site, e))
            return ("site", self.canon(e.args[0]))
        op = e.op.name if isinstance(e.op, tvm.ir.Op) else None
        args = [self.canon(a) for a in e.args] if op in _UNARY or op in _COMMUTATIVE or op == "relax.subtract" else []
        if any(a is None for a in args):
            return None
        if op in _UNARY:
            return (_UNARY[op], args[0])
        if op in _COMMUTATIVE:
            return _add(*args) if op == "relax.add" else _mul(*args)
        if op == "relax.subtract":
            return _add(args[0], ("neg", args[1]))
        if op == "relax.take" and int(e.attrs.axis) == 0 and self.is_t(e.args[1]):
            inner = self.canon(e.args[0])
            return None if inner is None else ("row", inner)
        if op == "relax.reshape" and _same_shape(e.args[0], e):
            return self.canon(e.args[0])
        if op == "relax.strided_slice":
            return self._slice(e)
        return None

    def _slice(self, e: relax.Call) -> Any:
        src = self.canon(e.args[0])
        dims = expr_dims(e.args[0])
        strides = int_values(e.args[4]) if len(e.args) > 4 else []  # (none given: all 1)
        if src is None or dims is None or any(s != 1 for s in strides):
            return None
        if _same_shape(e.args[0], e):
            return src  # the whole range
        axes, begin, end = int_values(e.args[1]), int_values(e.args[2]), int_values(e.args[3])
        if len(axes) != 1 or axes[0] % len(dims) != len(dims) - 1 or not isinstance(dims[-1], tvm.tirx.IntImm):
            return None
        return _slice(begin[0], min(end[0], int(dims[-1])), src)


def _is_zero(e) -> bool:
    arr = const_array(e)
    return arr is not None and arr.size == 1 and arr.item() == 0


def _same_shape(a, b) -> bool:
    da, db = expr_dims(a), expr_dims(b)
    return da is not None and db is not None and tvm_ffi.structural_equal(da, db)


def _lstm(xp, h, c, hid: int, order):
    """h', c' of PyTorch's LSTM cell with gates i, f, g, o in column chunks ``order``."""
    pre = _add(("row", xp), ("site", h))
    i, f, g, o = (_slice(q * hid, (q + 1) * hid, pre) for q in order)
    c1 = _add(_mul(("sigmoid", f), c), _mul(("sigmoid", i), ("tanh", g)))
    return _mul(("sigmoid", o), ("tanh", c1)), c1


def _gru(xp, h, hid: int, order):
    """h' of PyTorch's GRU cell with gates r, z, n in column chunks ``order``."""
    x, hh = ("row", xp), ("site", h)
    r, z, n = ((_slice(q * hid, (q + 1) * hid, x), _slice(q * hid, (q + 1) * hid, hh)) for q in order)
    rg, zg = ("sigmoid", _add(*r)), ("sigmoid", _add(*z))
    ng = ("tanh", _add(n[0], _mul(rg, n[1])))
    return _add(_mul(_add(("c", 1.0), ("neg", zg)), ng), _mul(zg, h))


def match_cell(mod: tvm.IRModule, step: relax.Function, n_state: int) -> dict | None:
    """``{"cell", "xp", "h", "c", "site", "call"}`` (parameter indices of the step) when ``step``'s
    outputs -- ``n_state`` new carried values, then scan outputs -- are a gated LSTM / GRU cell."""
    ret = step.body.body
    ret = relax.analysis.get_var2val(step).get(ret, ret)
    outs = list(ret.fields) if isinstance(ret, relax.Tuple) else []
    if len(outs) <= n_state or n_state not in (1, 2):
        return None
    st = _Step(mod, step)
    trees = [st.canon(o) for o in outs]
    calls = [c for _, c in st.sites]  # the one site, however often the trees reach it
    if any(t is None for t in trees) or not calls or not all(c.same_as(calls[0]) for c in calls):
        return None
    site, call = st.sites[0]
    rows = {t for tree in trees for t in _leaves(tree, "row")}
    if len(rows) != 1 or next(iter(rows))[1][0] != "p":
        return None
    xp = next(iter(rows))[1]
    dims = expr_dims(outs[0])
    hid = int(dims[-1]) if dims and isinstance(dims[-1], tvm.tirx.IntImm) else 0
    gates = 4 if n_state == 2 else 3
    if hid == 0 or list(site["shape"]) != [gates * hid, hid]:
        return None
    for hi in range(n_state):  # which carried value is h
        h = ("p", 2 + hi)
        c = ("p", 2 + 1 - hi)
        for order in itertools.permutations(range(gates)):
            if n_state == 2:
                h1, c1 = _lstm(xp, h, c, hid, order)
                want = [h1, c1][:: 1 if hi == 0 else -1] + [h1] * (len(outs) - 2)
                # ONNX order i, o, f, c from PyTorch's i, f, g, o
                cell = CellSpec("lstm", hid, gate_order=(order[0], order[3], order[1], order[2]))
            else:
                h1 = _gru(xp, h, hid, order)
                want = [h1] * len(outs)
                cell = CellSpec("gru", hid, linear_before_reset=True, gate_order=(order[1], order[0], order[2]))
            if trees == want:
                return {"cell": cell, "xp": xp[1], "h": 2 + hi, "c": 2 + 1 - hi if n_state == 2 else None,
                        "site": site, "call": call}
    return None


def _leaves(tree, tag: str):
    if isinstance(tree, tuple):
        if tree and tree[0] == tag:
            yield tree
        for sub in tree[1:]:
            yield from _leaves(sub, tag)


def _callee(mod: tvm.IRModule, gv: tvm.ir.GlobalVar) -> tvm.ir.GlobalVar | None:
    """The one Relax function (not a site) that function ``gv`` calls besides itself, or None."""
    gvs = [g for g in relax.analysis.all_global_vars(mod[gv])
           if not g.same_as(gv) and isinstance(mod[g], relax.Function) and attr(mod[g], SITE) is None]
    return gvs[0] if len(gvs) == 1 else None


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.var2val: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self._fuse(binding.value)
        if new is None:
            super().visit_var_binding_(binding)
        else:
            rebind(self, binding, new)

    def _fuse(self, call) -> relax.Expr | None:
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.GlobalVar):
            return None
        chunks = self.mod[call.op]
        info = attr(chunks, LOOP) if isinstance(chunks, relax.Function) else None
        if info is None or any(info["reversed_outputs"]) or not _is_zero(call.args[0]):
            return None
        loop = _callee(self.mod, call.op)
        step_gv = _callee(self.mod, loop) if loop is not None else None
        if step_gv is None:
            return None
        step = self.mod[step_gv]
        n_args = len(step.params) - 2  # carried, per-step inputs, invariants: chunks' args 2.. in order
        n_out = len(call.args) - 2 - n_args
        n_state = len(step.ret_ty.fields) - n_out
        found = match_cell(self.mod, step, n_state)
        if found is None:
            return None
        args = call.args[2:]
        xp, h0 = args[found["xp"] - 2], args[found["h"] - 2]
        c0 = args[found["c"] - 2] if found["c"] is not None else h0
        xd, hd = expr_dims(xp), expr_dims(h0)
        length = self._length(call.args[1])
        if (xd is None or hd is None or len(xd) != 3 or length is None or not isinstance(hd[0], tvm.tirx.IntImm)
                or not tvm_ffi.structural_equal(xd[0], length)):
            return None
        site, dyn = found["site"], found["call"]
        cell: CellSpec = found["cell"]
        batch, hid = int(hd[0]), cell.hidden
        new_site = {**site, "kind": DYNAMIC_RECURRENT.name, "m": batch, "seq": length, "cell": cell.to_json(),
                    "summary": f"{cell.kind.upper()} time loop; " + site["summary"]}
        f32 = "float32"
        out_ty = relax.TupleType([relax.TensorType([length, batch, hid], f32), relax.TensorType([batch, hid], f32),
                                  relax.TensorType([batch, hid], f32)])
        res = self.builder_.emit(emit_site(self.builder_, new_site, [self.visit_expr(xp), self.visit_expr(h0),
                                                                     self.visit_expr(c0), *dyn.args[1:]],
                                           out_ty, "dynamic_recurrent_site"))
        y, h_n, c_n = (relax.TupleGetItem(res, i) for i in range(3))
        states = [h_n, c_n] if found["h"] == 2 else [c_n, h_n]
        return relax.Tuple(states[:n_state] + [y] * n_out)

    def _length(self, n: relax.Expr):
        """The loop length ``n`` (``reshape(shape_to_tensor(shape([d])), [])``) as the dim ``d``."""
        v = self.var2val.get(n, n)
        if isinstance(v, relax.Call) and v.op == tvm.ir.Op.get("relax.reshape"):
            v = self.var2val.get(v.args[0], v.args[0])
            if isinstance(v, relax.Call) and v.op == tvm.ir.Op.get("relax.shape_to_tensor"):
                shape = v.args[0]
                if isinstance(shape, relax.ShapeExpr) and len(shape.values) == 1:
                    return shape.values[0]
        return None


@tvm.transform.module_pass(opt_level=0, name="FuseDynamicRecurrences")
class FuseDynamicRecurrences:
    """Make a loop whose body is a gated LSTM/GRU cell one ``dynamic_recurrent`` site (contract: module
    docstring)."""

    def __init__(self, family: KernelFamily):
        self.family = family

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.family.supports(DYNAMIC_RECURRENT.name):
            return mod
        return rewrite_with_bindings(_Fuser(mod), mod)  # (the replaced loops' functions die)
