"""LowerWeightSites: replace every decided site by the kernel the target's family generates for it.

Contract
- Input: calls of site functions with a ``bscompile.layout`` attribute (``ChooseLayout``).
- Output: each such call becomes ``call_tir`` of a kernel from the family passed to the
  pass (:meth:`KernelFamily.kernel`), with the kind's calling convention
  (:meth:`SiteKind.kernel_args`): each weight matrix packed into the chosen layout --
  ``BSRMatrix`` data, indices and row pointers as constants, or, for a weight computed
  at run time (always dense), Relax ops that pack it into the dense layout -- and its
  bias re-padded to the layout's rows (a kind with a layout of its own packs its
  operands itself: :attr:`SiteKind.pack`). The kernel keeps the site's attributes, its
  layout attribute completed with the schedules used (``schedules``, or per bucket of
  a symbolic m in ``buckets``: the kernel dispatches on m at run time) and
  ``stored_bytes``. Site functions no longer called are removed. Numerics are
  unchanged up to float reassociation. The constant weights are packed on all cores
  (NumPy releases the GIL) while the kernels are made one by one, each kernel waiting
  for its own weights only.
- Left alone: calls of undecided site functions; everything already lowered
  (the pass is idempotent).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.family import Bucket, KernelFamily
from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BSRMatrix, padded
from bscompile.passes.rewrite import rewrite_relax_functions
from bscompile.sites import LAYOUT, SITE, SPARSITY, attr, const_array, site_calls, site_kind


def pack_dense_rows(bb: relax.BlockBuilder, w: relax.Expr, rows: int, cols: int) -> relax.Expr:
    """``BSRMatrix.dense(w, DENSE_ROWS).data`` of a run-time ``w[rows, cols]``, as Relax ops."""
    n_pad = padded(rows, DENSE_ROWS)
    if n_pad != rows:
        w = bb.emit(relax.op.nn.pad(w, [0, n_pad - rows, 0, 0]))
    w = bb.emit(relax.op.reshape(w, [n_pad // DENSE_ROWS, DENSE_ROWS, cols]))
    return bb.emit(relax.op.permute_dims(w, [0, 2, 1]))


def _repad_bias(bb: relax.BlockBuilder, bias: relax.Expr, n: int, n_pad: int) -> relax.Expr:
    arr = const_array(bias)
    if arr is not None:
        out = np.zeros(n_pad, np.float32)
        out[:n] = arr[:n]
        return relax.const(out)
    return bias if n_pad == n else bb.emit(relax.op.nn.pad(bias, [0, n_pad - n]))


def _packed(w: np.ndarray, layout: dict) -> BSRMatrix:
    """A constant weight in ``layout``."""
    if layout["layout"] == "dense":
        return BSRMatrix.dense(w, DENSE_ROWS)
    return BSRMatrix.from_dense(w, BlockShape.parse(layout["block"]))


def _key(w_expr: relax.Expr, layout: dict) -> tuple:
    return w_expr.__chandle__(), layout["layout"], layout.get("block")


def _pack_all(mod: tvm.IRModule, pool: ThreadPoolExecutor) -> dict[tuple, Future]:
    """Every decided site's constant weight matrices, packing on ``pool`` in the order the sites
    are lowered: ``_key`` -> the future matrix."""
    jobs = {}
    for call in site_calls(mod):
        site, layout = attr(call.func, SITE), attr(call.func, LAYOUT)
        kind = site_kind(site["kind"])
        if layout is None or kind.pack is not None or not isinstance(call.func, relax.Function):
            continue
        for mat in kind.matrices(site):
            w_expr = call.operands[mat.weight]
            if const_array(w_expr) is not None and _key(w_expr, layout) not in jobs:
                jobs[_key(w_expr, layout)] = pool.submit(_packed, const_array(w_expr), layout)
    return jobs


def _pack(bb: relax.BlockBuilder, w_expr: relax.Expr, layout: dict,
          packed: dict[tuple, Future]) -> tuple[BSRMatrix, list[relax.Expr]]:
    """The matrix in ``layout`` (a skeleton for a run-time weight) and its ``[data, indices, indptr]``."""
    w = const_array(w_expr)
    if w is None:  # computed at run time: dense rows, packed by the program itself
        rows, cols = (int(v) for v in w_expr.ty.shape.values)
        mat = BSRMatrix.dense(np.zeros((rows, cols), np.float32), DENSE_ROWS)
        data = pack_dense_rows(bb, w_expr, rows, cols)
    else:
        job = packed.pop(_key(w_expr, layout), None)  # (popped: freed once a constant)
        mat = job.result() if job is not None else _packed(w, layout)
        data = relax.const(mat.data)
    return mat, [data, relax.const(mat.indices), relax.const(mat.indptr)]


@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, family: KernelFamily, pool: ThreadPoolExecutor):
        super().__init__(mod)
        self.mod, self.family = mod, family
        self.packed = _pack_all(mod, pool)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        ret = call.ty  # in the caller's symbolic vars (the site function has its own)
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.GlobalVar) or call.op not in self.mod.functions:
            return call
        func = self.mod[call.op]
        site, layout = attr(func, SITE), attr(func, LAYOUT)
        if site is None or layout is None or not isinstance(func, relax.Function):
            return call
        return self._lower(site, layout, func, list(call.args), ret)

    def _lower(self, site: dict, layout: dict, func: relax.Function, operands: list[relax.Expr],
               ret: relax.Type) -> relax.Expr:
        bb, kind, family = self.builder_, site_kind(site["kind"]), self.family
        tuned = layout.get("schedules") or []
        m = site["m"]
        if kind.pack is not None:  # a layout of the kind's own, packed below for the buckets' schedules
            mats, stats = [], [None]
        else:
            mats, packed = [], []
            for w in kind.matrices(site):
                mat, arrays = _pack(bb, operands[w.weight], layout, self.packed)
                bias = _repad_bias(bb, operands[w.bias], mat.shape[0], mat.padded_shape[0])
                mats.append(mat)
                packed.append((*arrays, bias))
            args, stored, stats = kind.kernel_args(operands, packed), sum(m.nbytes for m in mats), [m.stats for m in mats]
        whole = [{"lo": m, "hi": m, "m": m} if isinstance(m, int) else {"lo": 1, "hi": None, "m": 1}]
        buckets = [self._bucket(site, stats, b["lo"], b["hi"], b["m"], b.get("schedules", tuned))
                   for b in layout.get("buckets") or whole]  # (a hand-made decision may lack buckets)
        if kind.pack is not None:
            args, stored = kind.pack(site, operands, layout, [s for b in buckets for s in b.schedules])
        kernel = family.kernel(site, mats, buckets)
        done = {**layout, "stored_bytes": stored}
        if "buckets" in layout or not isinstance(m, int):
            done["buckets"] = [b.to_json() for b in buckets]
        else:
            done["schedules"] = [s.to_json() for s in buckets[0].schedules]
        kernel = kernel.with_attr(SITE, site).with_attr(LAYOUT, done)
        if func.attrs is not None and SPARSITY in func.attrs:
            kernel = kernel.with_attr(SPARSITY, func.attrs[SPARSITY])
        gv = bb.add_func(kernel, f"{site['kind']}_{layout['layout']}")
        out = list(ret.fields) if isinstance(ret, relax.TupleType) else ret
        return relax.call_tir(gv, relax.Tuple(args), out)

    def _bucket(self, site: dict, stats: list, lo: int, hi: int | None, m: int, tuned: list) -> Bucket:
        """One schedule per matrix for ``lo <= m <= hi``: the recorded ones, else the family's
        default for the packed matrix (its block statistics) at the bucket's m."""
        if tuned:
            scheds = [self.family.schedule_from_json(site, tuned[min(i, len(tuned) - 1)]) for i in range(len(stats))]
        else:
            scheds = [self.family.default_schedule(site, st, m) for st in stats]
        return Bucket(lo, hi, m, tuple(scheds))


@tvm.transform.module_pass(opt_level=0, name="LowerWeightSites")
class LowerWeightSites:
    """Replace each decided site by its family's kernel and packed constants (contract: module docstring)."""

    def __init__(self, family: KernelFamily):
        self.family = family

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            lowered = rewrite_relax_functions(_Lowerer(mod, self.family, pool), mod)
        return relax.transform.DeadCodeElimination()(lowered)
