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
:class:`bscompile.records.TuningRecord`; for a symbolic m one per bucket, at the
bucket's m) replace it by measurement. Sites whose weights are computed at run time
are dense. A kind whose kernels read a layout of their own (``SiteKind.fixed_layout``,
e.g. dynamic block selection) gets that layout, with the family's estimate against the
dense product of the same weight, and its schedules from the records when there are
some (a symbolic m needs a generator with ``symbolic_m``, else it is an error asking
for ``--input-shape``). A site whose ``m`` is
symbolic also gets ``buckets``: the schedules its kernel dispatches on at run time,
per range of m (see :func:`decide`).
"""

from __future__ import annotations

from typing import Mapping

import tvm

from bscompile.codegen.family import KernelFamily, site_buckets
from bscompile.errors import UnsupportedModelError
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


def _records_for(site: dict, buckets, records) -> list[TuningRecord] | None:
    """One record per bucket, all for one layout, or None."""
    recs = [(records or {}).get(record_key(site["fingerprint"], rep)) for _, _, rep in buckets]
    if any(r is None for r in recs) or len({(r.layout, r.block) for r in recs}) != 1:
        return None
    return recs


def decide(site: dict, sparsity: dict | None, family: KernelFamily, *, sparse: bool = True,
           force_block: BlockShape | None = None, records: Mapping[str, TuningRecord] | None = None) -> dict:
    """The ``bscompile.layout`` attribute of one site.

    A symbolic ``m`` is costed at each bucket's m (:data:`M_BUCKETS`): one layout serves
    every bucket (the weights are packed once), chosen by its mean time relative to dense
    over the buckets; each bucket gets its own schedules (``buckets``: ``lo``, ``hi``,
    ``m``, ``schedules``), neighbours with equal schedules merged. The estimates reported
    are at the first bucket's m."""
    n, k = site["shape"]
    kind = site_kind(site["kind"])
    buckets = site_buckets(site)
    symbolic = not isinstance(site["m"], int)
    if kind.fixed_layout is not None and symbolic and not family.generator(site["kind"]).symbolic_m:
        raise UnsupportedModelError(f"{site['kind']} site '{site.get('name')}' needs static shapes on {family.name} "
                                    f"(its m is {site['m']!r}): give them with --input-shape")
    dense_site = {**site, "kind": "linear" if kind.fixed_layout else site["kind"]}
    t_dense = [family.estimate_time(dense_site, dense_stats(n, k), rep) for _, _, rep in buckets]

    def score(stats: BlockStats) -> tuple[float, float]:
        """(mean time relative to dense over the buckets, time at the first bucket)"""
        times = [family.estimate_time(site, stats, rep) for _, _, rep in buckets]
        return sum(t / d for t, d in zip(times, t_dense)) / len(times), times[0]

    def decision(layout, block, t, reason, schedules=(), stats=None, tuned=None):
        out = {"layout": layout, "block": str(block), "est_time_us": _us(t), "dense_est_time_us": _us(t_dense[0]),
               "reason": reason, "schedules": [] if symbolic else list(schedules)}
        if symbolic:
            out["buckets"] = _bucket_schedules(family, site, buckets, stats, tuned)
        return out

    dense_block = BlockShape(DENSE_ROWS, k)
    if kind.fixed_layout is not None:  # the kind's kernels read their own layout; records pick schedules
        summary = f" ({site['summary']})" if "summary" in site else ""
        at = f" at m={buckets[0][2]}" if symbolic else ""
        recs = _records_for(site, buckets, records)
        t = family.estimate_time(site, None, buckets[0][2])
        if recs is not None:  # (no dense was measured: the estimate, scaled by the measured gain of tuning)
            rec = recs[0]
            return decision(kind.fixed_layout, site.get("tile", ""), t * rec.time_us / rec.dense_time_us,
                            f"tuned: {kind.fixed_layout}{summary} measured {rec.time_us:.1f} us vs its default "
                            f"schedule {rec.dense_time_us:.1f} us{at}", [rec.schedule], tuned=[r.schedule for r in recs])
        return decision(kind.fixed_layout, site.get("tile", ""), t,
                        f"{kind.fixed_layout}{summary}: est {_us(t):.1f} us vs dense {_us(t_dense[0]):.1f} us "
                        f"({t_dense[0] / t:.1f}x{at})")
    dense = dense_stats(n, k)
    if sparsity is None:
        return decision("dense", dense_block, t_dense[0], "dense: the weight is computed at run time", stats=dense)
    if not sparse:
        return decision("dense", dense_block, t_dense[0], "dense path requested", stats=dense)
    if sparsity["structure"] == "non-finite":
        return decision("dense", dense_block, t_dense[0], "dense: the weight holds NaN or inf, which only the dense "
                                                          "layout propagates as IEEE arithmetic does", stats=dense)
    stats = block_stats_of(sparsity)
    recs = _records_for(site, buckets, records)
    if recs is not None:
        rec = recs[0]
        block = dense_block if rec.layout == "dense" else BlockShape.parse(rec.block)
        return {**decision(rec.layout, block, rec.time_us * 1e-6,
                           f"tuned: {rec.layout} {block} measured {rec.time_us:.1f} us vs dense "
                           f"{rec.dense_time_us:.1f} us" + (" (m=1)" if symbolic else ""), [rec.schedule],
                           tuned=[r.schedule for r in recs]),
                "dense_est_time_us": round(rec.dense_time_us, 3)}
    if force_block is not None and sparsity["structure"] != "dense":
        st = next((s for s in stats if s.block == force_block), None)
        t = score(st)[1] if st else t_dense[0]
        return decision("bsr", force_block, t, f"block {force_block} forced by the user", stats=st)
    over = ", mean over m buckets" if symbolic else ""
    scored = [(s, *score(s)) for s in stats]
    best, rel, t_best = min(scored, key=lambda st: st[1])
    if rel < MARGIN:
        return decision("bsr", best.block, t_best,
                        f"bsr {best.block} keeps {best.block_density * 100:.1f}% of blocks; est {_us(t_best):.1f} us "
                        f"vs dense {_us(t_dense[0]):.1f} us ({1 / rel:.1f}x{over})", stats=best)
    return decision("dense", dense_block, t_dense[0],
                    f"dense: best sparse ({best.block}, {best.block_density * 100:.0f}% blocks) est "
                    f"{_us(t_best):.1f} us is not {1 / MARGIN:.2f}x under dense {_us(t_dense[0]):.1f} us"
                    f"{f' ({over[2:]})' if over else ''}",
                    stats=dense)


def _bucket_schedules(family: KernelFamily, site: dict, buckets, stats: BlockStats | None,
                      tuned: list[dict] | None) -> list[dict]:
    """Per bucket its schedules (tuned, else the family's default for ``stats`` at the bucket's m;
    empty without stats: ``LowerWeightSites`` uses the default for the packed matrix), with
    neighbours of equal schedules merged into one bucket."""
    out: list[dict] = []
    for i, (lo, hi, rep) in enumerate(buckets):
        if tuned is not None:
            scheds = [tuned[i]]
        elif stats is None and site_kind(site["kind"]).fixed_layout is None:
            scheds = []
        else:  # (a kind with a layout of its own needs no statistics for its schedules)
            scheds = [family.default_schedule(site, stats, rep).to_json()]
        if out and scheds and out[-1]["schedules"] == scheds:
            out[-1]["hi"] = hi
            continue
        out.append({"lo": lo, "hi": hi, "m": rep, "schedules": scheds})
    return out


@tvm.transform.module_pass(opt_level=0, name="ChooseLayout")
class ChooseLayout:
    """Decide each site's layout and schedules (``bscompile.layout``) from the family's machine model or
    tuning records (contract: module docstring)."""

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
