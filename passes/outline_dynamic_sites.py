"""OutlineDynamicSites: input-dependent block selection (Hadifar et al. 2020) becomes a dynamic weight site.

Contract
- Input: Relax after constant folding, holding the graph ``DynamicBlockLinear``
  exports (both PyTorch exporters give the same Relax after import and folding)::

      g    = matmul(x, WgT) + bg                       gate: one score per bs x bs tile
      gs   = g | where(dead, -inf, g)                  optional static block mask
      kth  = strided_slice(topk(gs, k)[0], k-1:)       the k-th largest score (at k = 1 the
             | topk(gs, 1)[0]                          import drops the whole-tensor slice)
      r0   = g * astype(greater_equal(gs, kth))        ties keep more than k
      r    = r0 / (sum(r0, -1, keepdims) / n_alive)
      y    = reshape(sum(reshape(matmul(reshape(x, [M, nbi, 1, bs]), W3), [M, nbi, nbo, bs])
                         * reshape(r, [M, nbi, nbo, 1]), axis=1), [M, out]) (+ bias)
             or, batched over the input blocks,
             reshape(sum(reshape(matmul(permute(reshape(x, [M, nbi, bs])), W3), [nbi, M, nbo, bs])
                         * permute(reshape(r, [M, nbi, nbo, 1])), axis=0), [M, out]) (+ bias)

  matched with relax.dpl patterns, whatever order the commutative ops take.
- Output: when every constant is consistent (``N = nbi * nbo = WgT.shape[1]``,
  ``1 <= k <= n_alive``, ``n_alive`` = the tiles the mask keeps, the slice takes the
  k-th value, every reshape splits ``in`` and ``out`` by the same ``bs``), the whole
  subgraph becomes one ``dynamic_linear`` site (followed by a reshape when ``y`` has static
  leading dims that flatten to ``M``: a product over every step of a sequence at once)
  on ``[x, W[out, in], bias, Wg[N, in], bg, alive[N]]`` with ``block``, ``k``, ``n_alive``, ``keep``, ``compute_fraction`` and a
  ``summary`` in its ``bscompile.site`` attribute. Its kernels read their own layout
  ("tiles": ``W`` tile-contiguous, the gate packed by groups of scores, the static mask
  folded into the gate bias as ``-inf``; :mod:`codegen.dynamic_layout`).
- Left alone (the generic path computes it, correctly): anything not proven
  equivalent -- run-time weights, non-float32, a symbolic feature dim, other reductions,
  other normalisers -- and every graph on a target whose family has no
  ``dynamic_linear`` generator. A symbolic batch (both exporters' default) is outlined,
  the site's ``m`` naming it, when the family's kernel takes a symbolic m
  (``Generator.symbolic_m``: the CPU one, dispatching per m bucket; the CUDA one, whose
  grid has m rows); else the graph is left alone. Idempotent.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, wildcard

from bscompile.codegen.dynamic_layout import DynamicShape, pack_gate, pack_tiles, pad_gate_bias, tile_panel
from bscompile.codegen.family import KernelFamily
from bscompile.passes.rewrite import rebind, rewrite_with_bindings
from bscompile.sites import (Matrix, SiteKind, const_array, const_name, emit_site, fingerprint,
                             register_site_kind)


def _pack(site: dict, operands, layout: dict, schedules) -> tuple[list[relax.Expr], int]:
    """``[x, tiles, gate_w, gate_b, bias]``: the arguments of the dynamic kernels; the tiles are
    whole, or in panels of the narrowest ``rows_tile / streams`` of the ``schedules`` (one per m
    bucket): :func:`~bscompile.codegen.dynamic_layout.tile_panel`."""
    x, w, bias, gw, gb, alive = operands
    arrays = [pack_tiles(const_array(w), site["block"], tile_panel(schedules)),
              pack_gate(const_array(gw)),
              pad_gate_bias(const_array(gb), const_array(alive)), const_array(bias).astype(np.float32)]
    return [x, *(relax.const(a) for a in arrays)], sum(a.nbytes for a in arrays)


#: Operands ``[x, W, bias, Wg, bg, alive]``; W's sparsity is what AnalyzeSparsity reports.
DYNAMIC = register_site_kind(SiteKind("dynamic_linear", lambda site: [Matrix(1, 2)], fixed_layout="tiles",
                                      pack=_pack))

_X, _WG, _BG, _W3, _N, _BIAS = wildcard(), is_const(), is_const(), is_const(), is_const(), is_const()
_DEAD, _INF1, _ALIVE, _INF2 = is_const(), is_const(), is_const(), is_const()
_GATE = is_op("relax.add")(is_op("relax.matmul")(_X, _WG), _BG)
_SCORES = is_op("relax.where")(_DEAD, _INF1, _GATE) | is_op("relax.where")(_ALIVE, _GATE, _INF2) | _GATE
_TOPK = is_op("relax.topk")(_SCORES)
_TOPV = is_tuple_get_item(_TOPK, 0)
# at k = 1 the slice ``[k-1:]`` takes the whole values tensor, and import drops it
_KTH = is_op("relax.strided_slice")(_TOPV, wildcard(), wildcard(), wildcard(), wildcard()) | _TOPV
_R0 = is_op("relax.multiply")(_GATE, is_op("relax.astype")(is_op("relax.greater_equal")(_SCORES, _KTH)))
_SUM_R0 = is_op("relax.sum")(_R0)
_R = is_op("relax.divide")(_R0, is_op("relax.divide")(_SUM_R0, _N))
# the tile products, broadcast over the examples (x as [M, nbi, 1, bs]) or batched over the
# input blocks (x as [nbi, M, bs]); the gates laid out to match
_XR, _XB = is_op("relax.reshape")(_X, wildcard()), is_op("relax.reshape")(_X, wildcard())
_XT = is_op("relax.permute_dims")(_XB)
_PART = is_op("relax.reshape")(is_op("relax.matmul")(_XR | _XT, _W3), wildcard())
_RR = is_op("relax.reshape")(_R, wildcard())
_RT = is_op("relax.permute_dims")(_RR)
_TILESUM = is_op("relax.sum")(is_op("relax.multiply")(_PART, _RR | _RT))
_Y = is_op("relax.reshape")(_TILESUM, wildcard())
_BIASED = is_op("relax.add")(_Y, _BIAS)


def _shape(expr) -> tuple[int | str, ...] | None:
    """Dims as ints, a symbolic dim as its text (one Relax function names each symbolic var
    once, so equal text is the same dim), or None without a known shape."""
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    if values is None:
        return None
    return tuple(int(v) if isinstance(v, tvm.tirx.IntImm) else str(v) for v in values)


def int_values(values) -> list[int]:
    """A tuple of integer immediates (strided_slice's axes/begin/end) or an attribute array as ints."""
    values = values.fields if hasattr(values, "fields") else values
    return [int(v.value) if hasattr(v, "value") else int(v) for v in values]


def _prove(m: dict) -> dict | None:
    """The site's operands and attributes if the matched subgraph is the method's, else None."""
    x = m[_X]
    xs = _shape(x)
    if xs is None or len(xs) != 2 or str(x.ty.dtype) != "float32":
        return None
    rows, fin = xs
    if not isinstance(fin, int):
        return None
    wg_t, bg, w3 = (const_array(m[p]) for p in (_WG, _BG, _W3))
    if any(a.dtype != np.float32 for a in (wg_t, bg, w3)) or wg_t.ndim != 2 or w3.ndim != 3:
        return None
    n_tiles = wg_t.shape[1]
    nbi, bs, fout = w3.shape
    if nbi * bs != fin or fout % bs or wg_t.shape[0] != fin or bg.shape != (n_tiles,):
        return None
    nbo = fout // bs
    if nbi * nbo != n_tiles:
        return None
    # static mask: where(dead, -inf, g) or where(alive, g, -inf)
    alive = np.ones(n_tiles, bool)
    for cond, fill, keep in ((_DEAD, _INF1, False), (_ALIVE, _INF2, True)):
        if cond in m:
            c, f = const_array(m[cond]), const_array(m[fill])
            if c.dtype != np.bool_ or c.size != n_tiles or f.size != 1 or f.item() != -np.inf:
                return None
            alive = c.reshape(n_tiles) if keep else ~c.reshape(n_tiles)
    n_alive = int(alive.sum())
    topk = m[_TOPK]
    k = int(topk.attrs.k)
    kth = m[_KTH]
    sliced = isinstance(kth, relax.Call)  # else the values themselves: the k-th only at k = 1
    if (int(topk.attrs.axis) not in (-1, 1) or not bool(topk.attrs.largest) or not 1 <= k <= n_alive
            or (not sliced and k != 1) or (sliced and (int_values(kth.args[1]) != [1] or int_values(kth.args[2])
                                                       != [k - 1] or int_values(kth.args[3])[0] < k))):
        return None
    s = m[_SUM_R0]
    norm = const_array(m[_N])
    if (int_values(s.attrs.axis) not in ([-1], [1]) or not bool(s.attrs.keepdims) or norm.size != 1
            or float(norm.item()) != float(n_alive)):
        return None
    batched = _XT in m
    if batched:  # [nbi, M, ...]: both operands of the tile product transposed alike
        ok = (_shape(m[_XB]) == (rows, nbi, bs) and int_values(m[_XT].attrs.axes) == [1, 0, 2]
              and _RT in m and int_values(m[_RT].attrs.axes) == [1, 0, 2, 3]
              and _shape(m[_PART]) == (nbi, rows, nbo, bs) and int_values(m[_TILESUM].attrs.axis) == [0])
    else:
        ok = (_shape(m[_XR]) == (rows, nbi, 1, bs) and _RT not in m and _shape(m[_PART]) == (rows, nbi, nbo, bs)
              and int_values(m[_TILESUM].attrs.axis) == [1])
    ys = _shape(m[_Y])
    if (not ok or _shape(m[_RR]) != (rows, nbi, nbo, 1) or bool(m[_TILESUM].attrs.keepdims)
            or not _rows_then(m[_Y], x, fout)):
        return None
    shape = DynamicShape(fin, fout, bs, k)
    return {"x": x, "w": np.ascontiguousarray(w3.reshape(fin, fout).T), "name": const_name(m[_W3]),
            "wg": np.ascontiguousarray(wg_t.T),
            "bg": bg, "alive": alive, "shape": shape, "n_alive": n_alive, "m": x.ty.shape.values[0],
            "out_shape": None if ys == (rows, fout) else m[_Y].ty.shape}


def _rows_then(y: relax.Expr, x: relax.Expr, fout: int) -> bool:
    """Whether ``y``'s shape is leading dims whose product is provably ``x``'s rows, then
    ``fout``: ``[M, out]``, or ``[T, B, out]`` of a product over every step of a sequence
    flattened to ``[T*B, in]`` (``T`` may be symbolic: a scan-form export's time axis)."""
    ys = getattr(getattr(y.ty, "shape", None), "values", None)
    if ys is None or len(ys) < 2 or not isinstance(ys[-1], tvm.tirx.IntImm) or int(ys[-1]) != fout:
        return False
    return tvm.sym.Analyzer().can_prove_equal(math.prod(ys[:-1]), x.ty.shape.values[0])


@relax.expr_functor.mutator
class _Outliner(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, symbolic: bool):
        super().__init__(mod)
        self.symbolic = symbolic  # whether the family's kernels take a symbolic m
        self.var2val: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found, bias = None, None
        m = _BIASED.extract_matched_expr(binding.value, self.var2val)
        if m is not None:  # add(y, bias), not add(bias, y): the kernel adds its bias last, like ONNX
            found, bias = _prove(m), const_array(binding.value.args[1])
            if found is None or bias is None or bias.dtype != np.float32 or bias.shape != (found["w"].shape[0],):
                found = None
        if found is None:
            m = _Y.extract_matched_expr(binding.value, self.var2val)
            found, bias = (_prove(m) if m is not None else None), None
        if found is not None and not isinstance(found["m"], tvm.tirx.IntImm) and not self.symbolic:
            found = None  # the family's dynamic kernels take static shapes only
        if found is None:
            super().visit_var_binding_(binding)
            return
        fout = found["w"].shape[0]
        new = self._emit(found, np.zeros(fout, np.float32) if bias is None else bias)
        rebind(self, binding, new)

    def _emit(self, f: dict, bias: np.ndarray) -> relax.Expr:
        shape: DynamicShape = f["shape"]
        key = fingerprint(f["w"])
        frac = shape.compute_fraction()
        m = int(f["m"]) if isinstance(f["m"], tvm.tirx.IntImm) else f["m"]
        site = {"kind": "dynamic_linear", "name": f["name"] or f"weight_{key[:8]}", "fingerprint": key,
                "m": m, "shape": [shape.out_features, shape.in_features], "block": shape.block,
                "tile": f"{shape.block}x{shape.block}", "k": shape.k,
                "n_alive": f["n_alive"], "keep": round(shape.k / f["n_alive"], 6), "compute_fraction": round(frac, 6),
                "summary": f"selects {shape.k} of {f['n_alive']} {shape.block}x{shape.block} tiles per row; "
                           f"{frac * 100:.0f}% of the dense compute with the gate"}
        operands = [self.visit_expr(f["x"]), relax.const(f["w"]), relax.const(bias), relax.const(f["wg"]),
                    relax.const(f["bg"]), relax.const(f["alive"])]
        y = emit_site(self.builder_, site, operands, relax.TensorType((m, shape.out_features), "float32"),
                      "dynamic_site")
        return y if f["out_shape"] is None else relax.op.reshape(self.builder_.emit(y), f["out_shape"])


@tvm.transform.module_pass(opt_level=0, name="OutlineDynamicSites")
class OutlineDynamicSites:
    """Make each input-dependent block selection (gate, top-k, gated product) one dynamic site (contract:
    module docstring)."""

    def __init__(self, family: KernelFamily):
        self.family = family

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.family.supports(DYNAMIC.name):
            return mod
        return rewrite_with_bindings(_Outliner(mod, self.family.generator(DYNAMIC.name).symbolic_m), mod)
