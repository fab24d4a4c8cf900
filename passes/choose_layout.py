"""ChooseLayout: pick dense or BSR (and the block shape) for every weight site.

Contract
- Input: site functions, analysed ones with a ``bscompile.sparsity`` attribute.
- Output: every site function without a ``bscompile.layout`` attribute gets one:
  ``layout`` ("dense" | "bsr"), ``block`` ("RxC"; dense is ``DENSE_ROWS`` x K),
  ``schedules`` (per matrix; empty: the family's default for the packed matrix),
  the estimates ``est_time_us`` / ``dense_est_time_us`` and a one-line ``reason``.
  Decided sites are left alone, so the pass is idempotent and a decision written by
  hand (or by the tuner) stands.

Every candidate BSR shape r x c (r, c in 1..32) is costed by the target family's
machine model (:meth:`KernelFamily.estimate_time`) from its measured block count,
against the dense layout of the same family. Sparse wins only when it is estimated
at least ``MARGIN`` faster, so bscompile never trades a sure dense kernel for a
marginal sparse one. ``sparse=False`` (bscompile's dense path) and ``force_block``
(a user override) bypass the search; tuning ``records`` ("fingerprint:m" ->
:class:`bscompile.records.TuningRecord`) replace it by measurement. Sites whose
weights are computed at run time are dense. A kind whose kernels read a layout of
their own (``SiteKind.fixed_layout``, e.g. dynamic block selection) gets that layout,
with the family's estimate against the dense product of the same weight.
"""

from __future__ import annotations

from typing import Mapping

import tvm

from bscompile.codegen.family import KernelFamily
from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BlockStats, padded
from bscompile.passes.analyze_sparsity import block_stats_of
from bscompile.records import TuningRecord, record_key
from bscompile.sites import LAYOUT, SITE, SPARSITY, attr, site_calls, site_kind

MARGIN = 0.85


def dense_stats(n: int, k: int) -> BlockStats:
    nbr = padded(n, DENSE_ROWS) // DENSE_ROWS
    return BlockStats(BlockShape(DENSE_ROWS, k), nbr, nbr, (nbr * DENSE_ROWS, k))


def _us(t: float) -> float:
    return round(t * 1e6, 3)


def decide(site: dict, sparsity: dict | None, family: KernelFamily, *, sparse: bool = True,
           force_block: BlockShape | None = None, records: Mapping[str, TuningRecord] | None = None) -> dict:
    """The ``bscompile.layout`` attribute of one site."""
    m = site["m"]
    n, k = site["shape"]
    kind = site_kind(site["kind"])
    t_dense = family.estimate_time({**site, "kind": "linear" if kind.fixed_layout else site["kind"]},
                                   dense_stats(n, k), m)

    def decision(layout, block, t, reason, schedules=()):
        return {"layout": layout, "block": str(block), "est_time_us": _us(t), "dense_est_time_us": _us(t_dense),
                "reason": reason, "schedules": list(schedules)}

    dense_block = BlockShape(DENSE_ROWS, k)
    if kind.fixed_layout is not None:  # the kind's kernels read their own layout
        t = family.estimate_time(site, None, m)
        summary = f" ({site['summary']})" if "summary" in site else ""
        return decision(kind.fixed_layout, site.get("tile", ""), t,
                        f"{kind.fixed_layout}{summary}: est {_us(t):.1f} us vs dense {_us(t_dense):.1f} us "
                        f"({t_dense / t:.1f}x)")
    if sparsity is None:
        return decision("dense", dense_block, t_dense, "dense: the weight is computed at run time")
    if not sparse:
        return decision("dense", dense_block, t_dense, "dense path requested")
    if sparsity["structure"] == "non-finite":
        return decision("dense", dense_block, t_dense, "dense: the weight holds NaN or inf, which only the dense "
                                                       "layout propagates as IEEE arithmetic does")
    rec = (records or {}).get(record_key(site["fingerprint"], m))
    if rec is not None:
        block = dense_block if rec.layout == "dense" else BlockShape.parse(rec.block)
        return {**decision(rec.layout, block, rec.time_us * 1e-6,
                           f"tuned: {rec.layout} {block} measured {rec.time_us:.1f} us vs dense "
                           f"{rec.dense_time_us:.1f} us", [rec.schedule]),
                "dense_est_time_us": round(rec.dense_time_us, 3)}
    stats = block_stats_of(sparsity)
    if force_block is not None and sparsity["structure"] != "dense":
        st = next((s for s in stats if s.block == force_block), None)
        t = family.estimate_time(site, st, m) if st else t_dense
        return decision("bsr", force_block, t, f"block {force_block} forced by the user")
    times = [family.estimate_time(site, s, m) for s in stats]
    best, t_best = min(zip(stats, times), key=lambda st: st[1])
    if t_best < MARGIN * t_dense:
        return decision("bsr", best.block, t_best,
                        f"bsr {best.block} keeps {best.block_density * 100:.1f}% of blocks; est {_us(t_best):.1f} us "
                        f"vs dense {_us(t_dense):.1f} us ({t_dense / t_best:.1f}x)")
    return decision("dense", dense_block, t_dense,
                    f"dense: best sparse ({best.block}, {best.block_density * 100:.0f}% blocks) est "
                    f"{_us(t_best):.1f} us is not {1 / MARGIN:.2f}x under dense {_us(t_dense):.1f} us")


@tvm.transform.module_pass(opt_level=0, name="ChooseLayout")
class ChooseLayout:
    def __init__(self, family: KernelFamily, *, sparse: bool = True, force_block: BlockShape | None = None,
                 records: Mapping[str, TuningRecord] | None = None):
        self.family, self.sparse, self.force_block, self.records = family, sparse, force_block, records or {}

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = mod.clone()
        for call in site_calls(mod):
            func = mod[call.gv]
            if not isinstance(func, tvm.relax.Function) or LAYOUT in func.attrs:
                continue
            layout = decide(attr(func, SITE), attr(func, SPARSITY), self.family, sparse=self.sparse,
                            force_block=self.force_block, records=self.records)
            mod[call.gv] = func.with_attr(LAYOUT, layout)
        return mod
