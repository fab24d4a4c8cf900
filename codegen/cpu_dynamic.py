"""TIR kernels for dynamic weight sites (input-dependent block selection) on LLVM CPUs.

One kernel computes ``y[m, out]`` of a dynamic site (semantics and packing in
:mod:`codegen.dynamic_layout`) in four phases:

1. **gate** ``g = x @ Wg.T + bg``, a small dense product (``in/bs^2`` of the dense
   cost) over groups of ``GATE_ROWS`` scores;
2. **selection** per row in O(N) on average: the k-th largest score by quickselect on a
   copy of the row (median-of-three pivot, branch-free compaction, no sort), then
   ``mask = g >= kth`` (ties keep more than k, as onnxruntime's TopK + GreaterOrEqual)
   and ``r = g*mask / (sum(g*mask) / n_alive)``;
3. **tile lists** per output block ``ob``: the union of the tiles ``ib`` the rows
   selected and, per tile, the rows that chose it with their scales, padded to whole
   groups of ``m_tile`` rows (padding repeats a row with scale 0). An output block
   whose gathered work would be at least ``dense_fraction`` of the masked dense
   product over its union tiles (every row, scale 0 where not selected) takes the
   masked dense product instead: same tiles, no row gather. Output blocks are then cut
   into ``chunks`` contiguous ranges of equal work (a prefix sum), one per thread;
4. **tile product**, output-stationary: per output block, the union's tiles stream
   in order from ``tiles[ob, ib]`` (contiguous, packed by :func:`pack_tiles` in panels of
   ``rows_tile`` output rows); per panel and group of ``m_tile`` rows an accumulator
   tile stays in registers over the ``bs`` inputs, then ``acc_y[row] += r * tile_sum``. Each output
   block belongs to one thread: no atomics.

Phases 2 and 3 are O(m * N) scalar work. Threads: either phase 1 and phase 4 are one
thread-pool launch each and phases 2-3 run once between them on the caller
(``gate_parallel``), or there is a single launch in which every thread runs phases 1-3
itself and then phase 4 on its own range: the gate is computed twice, but a pool that
must not spin (shared cores) wakes once and nobody waits for the slowest thread twice.
Or (``claim``, the default on two threads) a single launch in which the
two threads take gate groups and then output blocks from opposite ends, each marking an
item as taken before doing it, with a barrier between: no gate is computed twice, and
the caller's thread does the share of a worker that wakes late.

At batch 1 the symbolic kernel's tiles are packed in the narrow panels its larger
buckets want, so its whole-tile register tile reads ``bs / panel`` interleaved streams:
measured on one thread of an AMD EPYC (Zen 4), as fast as or 5-20% faster than one
stream (whole-tile packing, or a panel after the other with split accumulators).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import tvm
from tvm.script import tirx as T

from bscompile.codegen.claim import claim_macro, clear_flags, flag_slots
from bscompile.codegen.cpu_cost import MachineModel
from bscompile.codegen.dynamic_layout import GATE_ROWS, DynamicShape, tile_panel
from bscompile.codegen.family import Bucket, Cases, Generator, dispatch, static_dim

#: Seconds per step of the scalar selection and list loops (the machine models have no scalar rate).
_SCALAR_S = 0.5e-9

#: Multiply-adds below which the kernel runs on one thread (a sleeping pool's wake-up
#: costs tens of microseconds).
PARALLEL_MIN_WORK = 1 << 20


def _acc_registers(vector_lanes: int) -> int:
    """Vector registers a register tile may use: 24 of AVX-512's 32, 12 of AVX2's 16."""
    return 24 if vector_lanes >= 16 else 12


def _max_group_rows(rows_tile: int, vector_lanes: int) -> int:
    """Rows of a register tile ``rows_tile`` wide over several rows: at most 4, in half the
    vector registers (16 of AVX-512's 32, 8 of AVX2's; NEON counted as AVX2) -- the others
    carry the weight vectors and row broadcasts: with AVX2, 3 x 4 vectors in 12 of the 16
    spilled, 1.4-2.2x slower than 2 x 4 -- and under 1 KiB: TVM puts a buffer below 1 KiB
    on the stack and a larger one in a workspace, a pointer LLVM cannot tell apart from the
    tiles'; it then stores the register tile after every multiply-add (4 x 64 on AVX-512,
    1 KiB: 2x slower than 3 x 64)."""
    by_regs = (16 if vector_lanes >= 16 else 8) // -(-rows_tile // vector_lanes)
    return max(1, min(4, by_regs, (1024 - 1) // (4 * rows_tile)))


def _group_rows(rows: int, most: int) -> int:
    """Rows per group for a tile multiplied for ``rows`` rows: the fewest padded rows plus one
    per group (its accumulator reset and flush), the larger group on a tie. A tile's rows are
    padded to whole groups with scale-0 rows: groups of 4 for 2 rows doubled the multiply-adds."""
    return min(range(1, most + 1), key=lambda d: (-(-rows // d) * (d + 1), -d))


@dataclass(frozen=True)
class DynamicSchedule:
    """How a dynamic site's kernel is laid out on the CPU."""

    m_tile: int  # batch rows per register group (divides m)
    rows_tile: int  # output rows per register tile (divides the block)
    chunks: int  # parallel ranges of output blocks, balanced by work (1 = serial)
    #: True: the gate is its own parallel launch and selection runs once on the caller;
    #: False with chunks > 1: one launch, every thread computes gate and selection itself
    gate_parallel: bool
    #: per output block: the masked dense product when the gathered row groups are at least
    #: this fraction of its groups. 1.0: only when gathering saves no group (same FMAs, rows
    #: in order, no padding by repeated rows); below 1 it would trade FMAs for order, above
    #: 1 it is off. (0.9 measured slower than off at batch 2 in an interleaved benchmark in
    #: which each kernel ran right after another on the same input; see bench/dynamic.py.)
    dense_fraction: float = 1.0
    #: while multiplying a tile, prefetch the next one row by row (the tiles of a list are
    #: scattered, so the hardware prefetcher restarts at every tile); off by default: it
    #: measured slower on an AMD EPYC (Zen 4); left for the tuner and other cores
    prefetch: bool = False
    #: with ``chunks == 2``: one launch in which the two threads claim gate groups, then
    #: output blocks, walking from opposite ends (a plain flag per item; both doing one item
    #: writes the same values twice), with a barrier after the gate. The first thread awake
    #: takes what the other would have done (a sleeping pool's worker wakes tens of
    #: microseconds late), no gate group is computed twice on purpose, no thread waits for a
    #: slowest one except at the barrier (at most one group, unless the worker wakes after
    #: the whole gate)
    claim: bool = False
    #: a register tile reads its tile as this many interleaved streams: the tiles are packed
    #: in panels ``rows_tile / streams`` wide. A list's tiles are scattered, and each new one
    #: starts a stream the hardware prefetcher has not seen; two streams a tile keep more of
    #: them in flight. (1024 -> 4096 recurrence, 128x128 tiles, batch 1, two threads, 25
    #: interleaved rounds, AVX-512: with ``claim`` 4% faster at keep 0.25, 7-13% at keep 0.5;
    #: 512 -> 2048, 64x64: 4-7%. AVX2 code, 64-wide register tiles, on the same machine:
    #: 1.0-1.1x slower, so :func:`default_schedule` takes two with AVX-512 only; NEON not
    #: measured.)
    streams: int = 1

    def to_json(self) -> dict:
        return {"m_tile": self.m_tile, "rows_tile": self.rows_tile, "chunks": self.chunks,
                "gate_parallel": self.gate_parallel, "dense_fraction": self.dense_fraction,
                "prefetch": self.prefetch, "claim": self.claim, "streams": self.streams}


def default_schedule(shape: DynamicShape, m: int, vector_lanes: int = 8, threads: int = 2) -> DynamicSchedule:
    """Batch 1: whole tiles (one panel, ``block / lanes`` accumulators): each tile streams
    from memory once, row by row. Larger batches: register tiles of four vectors (two
    where the block is narrower) by up to 3 rows with AVX-512, 2 with AVX2 (:func:`_group_rows`), so a panel
    (``block x 4 lanes``, 32 KiB at bs 128 with AVX-512) stays in L1 while every row group
    of the tile passes over it; whole tiles would be re-read from L2 per group, half the
    FMA rate (measured at batch 16: 1.5x faster with panels of 32 than with whole tiles).
    Four vectors by 3 rows against the former two by 4, interleaved, best of 5 rounds, on
    an AMD EPYC (Zen 4, AVX-512, 2 threads): 1.11x / 1.05x for the 1024 -> 4096 input
    product at m = 50 and keep 0.5 / 0.25, 1.23x / 1.09x at m = 16, 1.04-1.14x for 64 and
    512 -> 2048 at m = 64; with AVX2 code on the same machine, four vectors by 2 rows against
    two by 4: 1.18x / 1.11x at m = 50, 1.00-1.10x elsewhere. Then the masked dense fallback where gathering saves no row
    group (none at batch 1, where the two are the same product). Parallel when the
    expected work (gate + selected tiles) is well above a thread-pool wake-up. At batch 1 with
    AVX-512 each tile is read as two streams (1024 -> 4096 at keep 0.25 / 0.5, interleaved,
    best of 25: 50 -> 45 and 82 -> 79 us; 512 -> 2048 in 64x64 tiles: 22 -> 21 and 34 -> 33 us).
    """
    regs = _acc_registers(vector_lanes)
    if m == 1:
        mt, rt = 1, shape.block
        while -(-rt // vector_lanes) > regs and rt % 2 == 0:
            rt //= 2
    else:
        rt = next((v * vector_lanes for v in (4, 2) if shape.block % (v * vector_lanes) == 0), shape.block)
        # rows a selected tile expects (m k / the union's tiles)
        union = shape.num_tiles * (1 - (1 - shape.k / shape.num_tiles) ** m)
        mt = _group_rows(max(1, round(m * shape.k / max(union, 1.0))), _max_group_rows(rt, vector_lanes))
    gate = m * shape.in_features * shape.num_tiles
    work = gate + m * shape.k * shape.block * shape.block
    chunks = threads if work >= PARALLEL_MIN_WORK and shape.nbo > 1 else 1
    # two threads: one launch, the threads claiming gate groups and output blocks (measured
    # 1.2x less CPU than every thread computing the whole gate at m = 1, 1.05x at m = 2-4).
    # A separate parallel gate launch wakes the pool twice: `bscompile tune` at m = 64 timed
    # it at 108 vs 79 us (the char LM's input product, 64 -> 2048) and 1769 vs 1649 us (the
    # 1024-wide layer's); at m = 16, 42 vs 35 and 496 vs 529 us. More threads: a separate gate
    # launch beyond m = 4. (At m = 1 the masked dense product is the gathered one: no fallback.)
    gate_parallel = chunks > 2 and m > 4
    # batch 1 with AVX-512: each tile read as two streams (``DynamicSchedule.streams``)
    streams = 2 if m == 1 and vector_lanes >= 16 and rt % (2 * vector_lanes) == 0 else 1
    return DynamicSchedule(mt, rt, chunks, gate_parallel=gate_parallel, dense_fraction=2.0 if m == 1 else 1.0,
                           claim=chunks == 2, streams=streams)


def dynamic_linear_kernel(in_features: int, out_features: int, block: int, k: int, m: int | None,
                          schedule, n_alive: int | None = None) -> tvm.tirx.PrimFunc:
    """The PrimFunc of one dynamic site, arguments (all float32, C-contiguous):

    - ``x[m, in]``;
    - ``tiles``: ``W[out, in]`` packed by :func:`dynamic_layout.pack_tiles` with
      ``panel = tile_panel(schedules)`` (the narrowest ``rows_tile`` of the schedules):
      ``[nbo, nbi, bs, bs]`` when that is ``bs``, else ``[nbo, nbi, bs / panel, bs, panel]``
      (the packing follows the schedules);
    - ``gate_w[ng, in, GATE_ROWS]``: ``Wg[N, in]`` packed by :func:`dynamic_layout.pack_gate`,
      ``ng = ceil(N / GATE_ROWS)``;
    - ``gate_b[ng * GATE_ROWS]``: :func:`dynamic_layout.pad_gate_bias` (``-inf`` on
      statically pruned tiles and padding, so they are never selected);
    - ``bias[out]`` (zeros for a site without bias);
    - ``y[m, out]``, the output.

    ``m`` is the static number of rows, or None for a symbolic one; ``schedule`` is one
    :class:`DynamicSchedule`, or the cases ``((lo, hi, schedule), ...)`` the kernel
    dispatches on at run time (:func:`codegen.family.dispatch`; a case of one size,
    ``lo == hi``, is generated for that static m). ``k`` counts selected tiles per row
    (``keep_count(keep, n_alive)``); ``n_alive`` is the number of tiles a static block mask
    keeps (default ``N``), the normaliser of ``r``.
    """
    shape = DynamicShape(in_features, out_features, block, k)
    n_alive = shape.num_tiles if n_alive is None else n_alive
    if not k <= n_alive <= shape.num_tiles:
        raise ValueError(f"n_alive = {n_alive} must be in [k = {k}, N = {shape.num_tiles}]")
    if isinstance(schedule, DynamicSchedule):
        schedule = ((m or 1, m, schedule),)
    return _kernel(shape, m, tuple(schedule), n_alive)


@functools.lru_cache(maxsize=64)
def _kernel(shape: DynamicShape, m_static: int | None, cases: Cases, n_alive: int) -> tvm.tirx.PrimFunc:
    fin, fout, bs = shape.in_features, shape.out_features, shape.block
    nbi, nbo = shape.nbi, shape.nbo
    ng = -(-shape.num_tiles // GATE_ROWS)
    panel = tile_panel([sc for _, _, sc in cases])
    for _, _, sc in cases:
        if bs % sc.rows_tile or sc.rows_tile % panel:
            raise ValueError(f"schedule {sc} does not tile block={bs} in panels of {panel}")
    npan = bs // panel
    m = m_static if m_static is not None else tvm.tirx.Var("m", "int32")
    bodies = [_body(shape, lo if lo == hi else m, sc, n_alive, panel) for lo, hi, sc in cases]
    run = dispatch(m, cases, bodies)
    tile_shape = (nbo, nbi, bs, bs) if npan == 1 else (nbo, nbi, npan, bs, panel)

    @T.prim_func(s_tir=True)
    def dynamic_linear(x_h: T.handle, tiles_in: T.Buffer(tile_shape, "float32"),
                       gate_w: T.Buffer((ng, fin, GATE_ROWS), "float32"),
                       gate_b: T.Buffer((ng * GATE_ROWS,), "float32"), bias: T.Buffer((fout,), "float32"),
                       y_h: T.handle):
        T.func_attr({"tir.noalias": True})
        x = T.match_buffer(x_h, (m, fin), "float32")
        y = T.match_buffer(y_h, (m, fout), "float32")
        tiles = T.decl_buffer((nbo, nbi, npan, bs, panel), "float32", data=tiles_in.data)  # panel view
        run(x, tiles, gate_w, gate_b, bias, y)

    return dynamic_linear.without_attr("global_symbol")


def gate_macro(fin: int | None, gm: int, bias: bool = True):
    """g[r0 + rows, group grp] = x[:, i0 : i0 + n] @ Wg[group, i0 : i0 + n].T (+ bg) for ``ngroups``
    groups of ``gm`` rows from ``r0``; ``gq`` chains over the inputs so FMAs overlap their latency.
    ``fin``: the static number of inputs ``n`` (the chains divide it), or None where ``n`` is known at
    run time only (then single inputs follow the whole chains); ``bias=False``: a partial score."""
    most = max(1, 8 // gm)
    gq = most if fin is None else max(d for d in range(1, most + 1) if fin % d == 0)

    @T.macro
    def gate_rows(x, gate_w, gate_b, g, grp, r0, ngroups, i0, n):
        for mo in T.serial(ngroups):
            gacc = T.alloc_buffer((gq, gm, GATE_ROWS), "float32")
            for c in T.unroll(gq):
                for j in T.unroll(gm):
                    for v in T.vectorized(GATE_ROWS):
                        gacc[c, j, v] = T.float32(0)
            for io in T.serial(n // gq):
                for c in T.unroll(gq):
                    for j in T.unroll(gm):
                        xv = T.Bind(x[r0 + mo * gm + j, i0 + io * gq + c])
                        for v in T.vectorized(GATE_ROWS):
                            gacc[c, j, v] = gacc[c, j, v] + gate_w[grp, i0 + io * gq + c, v] * xv
            if fin is None:
                for io in T.serial(n % gq):
                    for j in T.unroll(gm):
                        xv = T.Bind(x[r0 + mo * gm + j, i0 + n - n % gq + io])
                        for v in T.vectorized(GATE_ROWS):
                            gacc[0, j, v] = gacc[0, j, v] + gate_w[grp, i0 + n - n % gq + io, v] * xv
            # summed in registers and stored once: under ``claim`` two threads may write the
            # same group (the same values), so ``g`` never holds a partial sum
            for j in T.unroll(gm):
                row = T.Bind(r0 + mo * gm + j)
                if bias:
                    for v in T.vectorized(GATE_ROWS):
                        gacc[0, j, v] = gate_b[grp * GATE_ROWS + v] + gacc[0, j, v]
                for c in T.unroll(gq - 1):
                    for v in T.vectorized(GATE_ROWS):
                        gacc[0, j, v] = gacc[0, j, v] + gacc[c + 1, j, v]
                for v in T.vectorized(GATE_ROWS):
                    g[row, grp * GATE_ROWS + v] = gacc[0, j, v]

    return gate_rows


def phases(shape: DynamicShape, m, sched: DynamicSchedule, n_alive: int, panel: int) -> SimpleNamespace:
    """The kernel's phases for ``m`` rows under one schedule, as macros (``gate_group``,
    ``selection``, ``tile_lists``, ``product``) over the panel view of the tiles, with the
    sizes their scratch buffers take (``ng``, ``m_pad``, ``mt``, ``rt``): the whole kernel
    (:func:`_body`) and the recurrence (:func:`dynamic_recurrent_kernel`) compose them."""
    fin, bs, k = shape.in_features, shape.block, shape.k
    nbi, nbo, n_tiles = shape.nbi, shape.nbo, shape.num_tiles
    ng = -(-n_tiles // GATE_ROWS)
    mt, rt, chunks = sched.m_tile, sched.rows_tile, sched.chunks
    static = isinstance(m, int)
    m_pad = (m + mt - 1) // mt * mt
    nrt, rp = bs // rt, rt // panel  # register tiles per tile row, panels per register tile
    # gate: row groups of up to 4 (dividing a static m), then single rows
    gmt = max(d for d in range(1, 5) if m % d == 0) if static else 4
    gate_main, gate_tail = gate_macro(fin, gmt), gate_macro(fin, 1)
    dense_groups = (m + mt - 1) // mt  # groups of a masked dense tile (the last one padded)
    # masked dense when gathered groups * 1 >= dense_fraction * union * dense_groups (integer test)
    frac_num = int(round(sched.dense_fraction * 1024))

    lines = bs // 16  # 64-byte cache lines per tile row
    one_row = static and m == 1 and mt == 1 and sched.dense_fraction > 1  # (no masked dense at one row)

    @T.macro
    def prefetch_row(tiles, pf_ob, pf_ib, p, first):
        if sched.prefetch:
            if first:
                for ln in T.unroll(lines):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                  T.address_of(tiles[pf_ob, pf_ib, 0, p, ln * 16]), 0, 3, 1))

    @T.macro
    def flush(acc, acc_y, lrow, lscale, ob, u, j0, rc, nrows):
        """acc_y[row] += scale * acc for list entries j0 .. j0 + nrows - 1."""
        for jj in T.unroll(nrows):
            row = T.Bind(lrow[ob, u, j0 + jj])
            s = T.Bind(lscale[ob, u, j0 + jj])
            for q in T.vectorized(rt):
                acc_y[row, rc * rt + q] = acc_y[row, rc * rt + q] + acc[jj, q] * s

    @T.macro
    def tile_group(tiles, x, acc, acc_y, lrow, lscale, ob, ib, u, j0, rc, pf_ob, pf_ib, first):
        """acc_y[rows] += scale * (x[rows, ib-block] @ tile[:, rc-slice]) for one row group
        (``rp`` panels wide) in the register tile ``acc``; the first group of a tile
        prefetches tile (pf_ob, pf_ib)."""
        for j in T.unroll(mt):
            for q in T.vectorized(rt):
                acc[j, q] = T.float32(0)
        for p in T.serial(bs):
            prefetch_row(tiles, pf_ob, pf_ib, p, first)
            for j in T.unroll(mt):
                xv = T.Bind(x[lrow[ob, u, j0 + j], ib * bs + p])
                for pc in T.unroll(rp):
                    for q in T.vectorized(panel):
                        acc[j, pc * panel + q] = acc[j, pc * panel + q] + tiles[ob, ib, rc * rp + pc, p, q] * xv
        flush(acc, acc_y, lrow, lscale, ob, u, j0, rc, mt)

    @T.macro
    def gate_group(x, gate_w, gate_b, g, grp):
        gate_main(x, gate_w, gate_b, g, grp, 0, m // gmt, 0, fin)
        gate_tail(x, gate_w, gate_b, g, grp, m // gmt * gmt, m % gmt, 0, fin)

    @T.macro
    def selection(g, a, kth, scale, st):
        """kth[b]: the k-th largest score of row b by quickselect on a copy of the row
        (median-of-three pivot; each round counts the scores above and equal to the pivot,
        then keeps the side holding the k-th, compacted to the front without branches):
        about 3N comparisons, where a radix select's four 256-bucket passes cost several times
        that for N of a few hundred; scale[b] = sum(kept scores) / n_alive. Every round shrinks
        the candidates (the pivot is one of them), also with NaN scores. ``a``: ``n_tiles`` floats."""
        cnt = T.alloc_buffer((2,), "int32")  # above the pivot, equal to it
        fsum = T.alloc_buffer((1,), "float32")
        for b in T.serial(m):
            for n in T.serial(n_tiles):
                a[n] = g[b, n]
            st[0] = n_tiles  # candidates: a[0 : st[0]]
            st[1] = k - 1  # rank of the k-th among them, from the largest
            st[2] = 0  # done
            while st[2] == 0:
                size = T.Bind(st[0])
                if size <= 1:
                    kth[b] = a[0]
                    st[2] = 1
                else:
                    x0 = T.Bind(a[0])
                    x1 = T.Bind(a[size // 2])
                    x2 = T.Bind(a[size - 1])
                    piv = T.Bind(T.max(T.min(x0, x1), T.min(T.max(x0, x1), x2)))
                    cnt[0] = 0
                    cnt[1] = 0
                    for n in T.serial(size):
                        cnt[0] = cnt[0] + T.Cast("int32", a[n] > piv)
                        cnt[1] = cnt[1] + T.Cast("int32", a[n] == piv)
                    rank = T.Bind(st[1])
                    if rank < cnt[0]:  # among the larger ones
                        st[0] = 0
                        for n in T.serial(size):
                            v = T.Bind(a[n])
                            a[st[0]] = v  # (the write index never passes the read index)
                            st[0] = st[0] + T.Cast("int32", v > piv)
                    elif rank < cnt[0] + cnt[1]:
                        kth[b] = piv
                        st[2] = 1
                    else:  # among the smaller ones
                        st[1] = rank - cnt[0] - cnt[1]
                        st[0] = 0
                        for n in T.serial(size):
                            v = T.Bind(a[n])
                            a[st[0]] = v
                            st[0] = st[0] + T.Cast("int32", v < piv)
            fsum[0] = T.float32(0)
            for n in T.serial(n_tiles):  # (a select, not a branch: half the scores pass, at random)
                fsum[0] = fsum[0] + T.if_then_else(g[b, n] >= kth[b], g[b, n], T.float32(0))
            scale[b] = fsum[0] / T.float32(n_alive)

    @T.macro
    def one_row_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre):
        """tile_lists for one row (m = 1, groups of one row): compaction without branches (every
        tile is written at the next free place, which advances by whether it is selected), as
        half the tiles are selected at random: two unpredictable branches per tile otherwise."""
        wpre[0] = 0
        for ob in T.serial(nbo):
            ucnt[ob] = 0
            for ib in T.serial(nbi):
                v = T.Bind(g[0, ib * nbo + ob])
                u = T.Bind(ucnt[ob])
                lrow[ob, u, 0] = 0
                lscale[ob, u, 0] = v / scale[0]
                utile[ob, u] = ib
                ugroups[ob, u] = 1
                ucnt[ob] = u + T.Cast("int32", v >= kth[0])
            wpre[ob + 1] = wpre[ob] + ucnt[ob] + 1

    @T.macro
    def many_row_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre, st):
        wpre[0] = 0
        for ob in T.serial(nbo):
            st[3] = 0  # union tiles so far
            for ib in T.serial(nbi):
                st[1] = 0  # rows of this tile
                for b in T.serial(m):
                    if g[b, ib * nbo + ob] >= kth[b]:
                        lrow[ob, st[3], st[1]] = b
                        lscale[ob, st[3], st[1]] = g[b, ib * nbo + ob] / scale[b]
                        st[1] = st[1] + 1
                if st[1] > 0:
                    for j in T.serial(mt - 1):  # pad to whole groups: a chosen row, scale 0
                        if st[1] % mt != 0:
                            lrow[ob, st[3], st[1]] = lrow[ob, st[3], 0]
                            lscale[ob, st[3], st[1]] = T.float32(0)
                            st[1] = st[1] + 1
                    utile[ob, st[3]] = ib
                    ugroups[ob, st[3]] = st[1] // mt
                    st[3] = st[3] + 1
            ucnt[ob] = st[3]
            st[0] = 0
            for u in T.serial(nbi):
                if u < st[3]:
                    st[0] = st[0] + ugroups[ob, u]
            if st[0] * 1024 >= frac_num * st[3] * dense_groups and st[3] > 0:
                # masked dense over the union tiles: every row in order (the last group padded
                # with the last row), scale 0 where not selected
                for u in T.serial(nbi):
                    if u < st[3]:
                        for b in T.serial(m_pad):
                            n_ = T.Bind(utile[ob, u] * nbo + ob)
                            row = T.Bind(T.min(b, m - 1))
                            lrow[ob, u, b] = row
                            lscale[ob, u, b] = T.if_then_else(b < m and g[row, n_] >= kth[row],
                                                              g[row, n_] / scale[row], T.float32(0))
                        ugroups[ob, u] = dense_groups
                st[0] = st[3] * dense_groups
            wpre[ob + 1] = wpre[ob] + st[0] + 1

    @T.macro
    def tile_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre, bounds, st):
        """Per output block: union tiles, their rows (or every row: masked dense), the work
        prefix sum, and ``bounds``: contiguous ranges of output blocks of equal work."""
        if one_row:
            one_row_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre)
        else:
            many_row_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre, st)
        bounds[0] = 0
        st[0] = 1
        for ob in T.serial(nbo):
            if st[0] < chunks:
                if wpre[ob + 1] * chunks >= st[0] * wpre[nbo]:
                    bounds[st[0]] = ob + 1
                    st[0] = st[0] + 1
        for c in T.serial(chunks + 1):
            if c >= st[0]:
                bounds[c] = nbo

    @T.macro
    def product(tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt, ob_lo, ob_hi):
        """Output-stationary tile product over output blocks [ob_lo, ob_hi), ``acc`` the register tile."""
        acc_y = T.alloc_buffer((m, bs), "float32")
        for ob in T.serial(ob_lo, ob_hi):
            for b in T.serial(m):
                for q in T.vectorized(bs):
                    acc_y[b, q] = T.float32(0)
            for u in T.serial(ucnt[ob]):
                ib = T.Bind(utile[ob, u])
                # the next tile in this chunk's order: the next of the list, else the
                # first of the next output block (any in-bounds tile will do at the end)
                last = T.Bind(u + 1 >= ucnt[ob])
                pf_ob = T.Bind(T.if_then_else(last, T.min(ob + 1, nbo - 1), ob))
                pf_ib = T.Bind(T.if_then_else(last, utile[T.min(ob + 1, nbo - 1), 0],
                                              utile[ob, T.min(u + 1, nbi - 1)]))
                for rc in T.serial(nrt):
                    for grp in T.serial(ugroups[ob, u]):
                        tile_group(tiles, x, acc, acc_y, lrow, lscale, ob, ib, u, grp * mt, rc,
                                   pf_ob, pf_ib, rc == 0 and grp == 0)
            for b in T.serial(m):
                for q in T.vectorized(bs):
                    y[b, ob * bs + q] = acc_y[b, q] + bias[ob * bs + q]

    # the per-thread lists: (name, dtype, shape); of a few hundred tiles, each is 1 KiB or
    # more, which TVM takes from the workspace pool (kMaxStackAlloca): once per step of a
    # time loop and thread unless the loop's caller hands in memory of its own (``scratch``)
    lists_layout = (("a", "float32", (n_tiles,)), ("lscale", "float32", (nbo, nbi, m_pad)),
                    ("lrow", "int32", (nbo, nbi, m_pad)), ("utile", "int32", (nbo, nbi)),
                    ("ugroups", "int32", (nbo, nbi)))
    offsets, scratch = {}, {"float32": 0, "int32": 0}
    for name, dtype, shp in lists_layout:
        offsets[name] = scratch[dtype]
        scratch[dtype] += math.prod(shp)

    def with_lists(then, hoisted: bool = False):
        """A macro ``(g, tiles, x, bias, y, extra)`` for the body of a parallel loop: the register
        tile first (its own memory: see :func:`_body`), the selection and tile lists of ``g`` into
        buffers of the thread's own, then ``then(tiles, x, bias, y, acc, lrow, lscale, utile,
        ugroups, ucnt, bounds, extra)`` (the macro that multiplies the thread's output blocks).
        ``hoisted``: the macro takes ``(..., extra, sf, si, ch)`` and keeps the lists in row ``ch``
        of ``sf[chunks, scratch["float32"]]`` and ``si[chunks, scratch["int32"]]``, allocated
        by the caller once (outside its time loop)."""

        @T.macro
        def lists(g, tiles, x, bias, y, extra, a, lrow, lscale, utile, ugroups):
            acc = T.alloc_buffer((mt, rt), "float32")
            for j in T.unroll(mt):
                for q in T.vectorized(rt):
                    acc[j, q] = T.float32(0)
            kth = T.alloc_buffer((m,), "float32")
            scale = T.alloc_buffer((m,), "float32")
            ucnt = T.alloc_buffer((nbo,), "int32")
            wpre = T.alloc_buffer((nbo + 1,), "int32")
            bounds = T.alloc_buffer((chunks + 1,), "int32")
            st = T.alloc_buffer((4,), "int32")
            selection(g, a, kth, scale, st)
            tile_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre, bounds, st)
            then(tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt, bounds, extra)

        @T.macro
        def own(g, tiles, x, bias, y, extra):
            a = T.alloc_buffer((n_tiles,), "float32")
            lrow = T.alloc_buffer((nbo, nbi, m_pad), "int32")
            lscale = T.alloc_buffer((nbo, nbi, m_pad), "float32")
            utile = T.alloc_buffer((nbo, nbi), "int32")
            ugroups = T.alloc_buffer((nbo, nbi), "int32")
            lists(g, tiles, x, bias, y, extra, a, lrow, lscale, utile, ugroups)

        @T.macro
        def views(g, tiles, x, bias, y, extra, sf, si, ch):
            fo = T.Bind(ch * scratch["float32"])
            io = T.Bind(ch * scratch["int32"])
            a = T.decl_buffer((n_tiles,), "float32", data=sf.data, elem_offset=fo + offsets["a"])
            lscale = T.decl_buffer((nbo, nbi, m_pad), "float32", data=sf.data, elem_offset=fo + offsets["lscale"])
            lrow = T.decl_buffer((nbo, nbi, m_pad), "int32", data=si.data, elem_offset=io + offsets["lrow"])
            utile = T.decl_buffer((nbo, nbi), "int32", data=si.data, elem_offset=io + offsets["utile"])
            ugroups = T.decl_buffer((nbo, nbi), "int32", data=si.data, elem_offset=io + offsets["ugroups"])
            lists(g, tiles, x, bias, y, extra, a, lrow, lscale, utile, ugroups)

        return views if hoisted else own

    @T.macro
    def block_item(ob, args):
        tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt = args
        product(tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt, ob, ob + 1)

    claim_block_items = claim_macro(nbo, block_item)

    @T.macro
    def claim_blocks(tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt, bounds, extra):
        """``then`` for :func:`with_lists` (``extra = (t, taken, mark)``): output blocks from the
        front (thread 0) or the back until one the other thread took."""
        claim_block_items(extra[0], extra[1], extra[2], (tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt))

    return SimpleNamespace(gate_group=gate_group, selection=selection, tile_lists=tile_lists, product=product,
                           claim_blocks=claim_blocks, with_lists=with_lists, scratch=scratch,
                           ng=ng, m_pad=m_pad, mt=mt, rt=rt)


def _body(shape: DynamicShape, m, sched: DynamicSchedule, n_alive: int, panel: int):
    """The whole kernel for ``m`` rows (an int, or the kernel's symbolic m) under one schedule:
    a macro ``(x, tiles, gate_w, gate_b, bias, y)`` over the panel view of the tiles."""
    ph = phases(shape, m, sched, n_alive, panel)
    gate_group, selection, tile_lists, product = ph.gate_group, ph.selection, ph.tile_lists, ph.product
    nbi, nbo, ng, m_pad, mt, rt, chunks = shape.nbi, shape.nbo, ph.ng, ph.m_pad, ph.mt, ph.rt, sched.chunks
    n_tiles = shape.num_tiles
    chunk_loop = T.parallel if chunks > 1 else T.serial

    # Either one launch in which every thread computes the gate, the selection and the
    # lists itself (redundant work, ~in/bs^2 of the dense product, instead of a second
    # wake-up of the pool and a wait for its slowest thread) and multiplies its own range,
    # or (gate_parallel, or serial) phases 1 and 4 are one loop each and phases 2-3 run
    # once in between. The chunk a product loop multiplies is ``ch + c2``: one is always 0.
    one_launch = chunks > 1 and not sched.gate_parallel
    outer_loop, outer = (T.parallel, chunks) if one_launch else (T.serial, 1)
    inner_loop, inner = (T.serial, 1) if one_launch else (chunk_loop, chunks)
    gate_loop = T.parallel if sched.gate_parallel and not one_launch else T.serial

    # The register tile ``acc`` must be a buffer of its own, which LLVM keeps in registers.
    # StorageRewrite gives a buffer first used after another one died in the same scope
    # (the function, or one parallel loop) that one's memory: ``acc`` would then live in
    # the gate scores' workspace and be stored at every FMA step (2x slower at batch 1).
    # So where the product shares its scope with the other phases, ``acc`` is zeroed
    # first of all (live from the start, nothing to reuse); a parallel product loop has
    # its own scope, and its own ``acc`` per thread.
    @T.macro
    def product_own_acc(tiles, x, bias, y, acc_unused, lrow, lscale, utile, ugroups, ucnt, ob_lo, ob_hi):
        acc = T.alloc_buffer((mt, rt), "float32")
        product(tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt, ob_lo, ob_hi)

    run_product = product_own_acc if inner > 1 else product

    @T.macro
    def body(x, tiles, gate_w, gate_b, bias, y):
        for ch in outer_loop(outer):
            acc = T.alloc_buffer((mt, rt), "float32")
            for j in T.unroll(mt):
                for q in T.vectorized(rt):
                    acc[j, q] = T.float32(0)
            g = T.alloc_buffer((m, ng * GATE_ROWS), "float32")
            kth = T.alloc_buffer((m,), "float32")
            scale = T.alloc_buffer((m,), "float32")
            lrow = T.alloc_buffer((nbo, nbi, m_pad), "int32")  # rows of union tile u of block ob
            lscale = T.alloc_buffer((nbo, nbi, m_pad), "float32")
            utile = T.alloc_buffer((nbo, nbi), "int32")  # union tile u of block ob -> ib
            ugroups = T.alloc_buffer((nbo, nbi), "int32")  # row groups of union tile u
            ucnt = T.alloc_buffer((nbo,), "int32")
            wpre = T.alloc_buffer((nbo + 1,), "int32")  # prefix sum of work per output block
            bounds = T.alloc_buffer((chunks + 1,), "int32")
            st = T.alloc_buffer((4,), "int32")  # scalar state of the selection and the lists
            for grp in gate_loop(ng):
                gate_group(x, gate_w, gate_b, g, grp)
            a = T.alloc_buffer((n_tiles,), "float32")
            selection(g, a, kth, scale, st)
            tile_lists(g, kth, scale, lrow, lscale, utile, ugroups, ucnt, wpre, bounds, st)
            for c2 in inner_loop(inner):
                run_product(tiles, x, bias, y, acc, lrow, lscale, utile, ugroups, ucnt, bounds[ch + c2],
                            bounds[ch + c2 + 1])

    if not (sched.claim and chunks == 2):
        return body

    @T.macro
    def gate_item(grp, args):
        gate_group(args[0], args[1], args[2], args[3], grp)

    claim_gates = claim_macro(ng, gate_item)
    claimed = ph.with_lists(ph.claim_blocks)
    clear_gates, clear_blocks = clear_flags(ng), clear_flags(nbo)

    @T.macro
    def body_claim(x, tiles, gate_w, gate_b, bias, y):
        g = T.alloc_buffer((m, ng * GATE_ROWS), "float32")  # shared by the threads
        gate_taken = T.alloc_buffer((flag_slots(ng),), "int32")
        block_taken = T.alloc_buffer((flag_slots(nbo),), "int32")
        clear_gates(gate_taken)
        clear_blocks(block_taken)
        # one thread-pool launch: every pool thread runs this body; each parallel loop
        # hands its iterations to the threads (t = thread id with 2 threads)
        with T.attr(0, "pragma_parallel_launch_point", 1):
            with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                for t in T.parallel(2):
                    claim_gates(t, gate_taken, 1, (x, gate_w, gate_b, g))
            for t in T.parallel(2):
                claimed(g, tiles, x, bias, y, (t, block_taken, 1))

    return body_claim


class DynamicGenerator(Generator):
    """The ``dynamic_linear`` kind on LLVM CPUs: :func:`dynamic_linear_kernel` and its model.

    Cost: the gate (a dense ``N x in`` product) plus the tile product over the union of
    the rows' selections -- ``1 - (1 - k/N)^m`` of the tiles in expectation for
    independent rows -- streamed once, with ``m * k`` tile products of FMAs, both on the
    block-row model of :mod:`codegen.cpu_cost`."""

    symbolic_m = True

    def __init__(self, machine: MachineModel):
        self.machine = machine

    @staticmethod
    def _shape(site: dict) -> DynamicShape:
        out_f, in_f = site["shape"]
        return DynamicShape(in_f, out_f, site["block"], site["k"])

    def kernel(self, site: dict, mats: list, buckets: list[Bucket]) -> tvm.tirx.PrimFunc:
        """Dispatches on a symbolic m over ``buckets`` (one schedule each); a static m has one bucket."""
        out_f, in_f = site["shape"]
        cases = tuple((b.lo, b.hi, b.schedules[0]) for b in buckets)
        return dynamic_linear_kernel(in_f, out_f, site["block"], site["k"], static_dim(site["m"]), cases,
                                     site["n_alive"])

    def default_schedule(self, site: dict, stats, m: int) -> DynamicSchedule:
        return default_schedule(self._shape(site), m, self.machine.lanes)

    def schedule_space(self, site: dict, mat, m: int) -> list[DynamicSchedule]:
        """The default, the masked dense fallback off (``dense_fraction`` 2) and taken earlier
        (0.5) at m > 1, the other panel width, software prefetch and one or two streams a tile at m = 1,
        the other ways of running the gate in parallel (its own launch, every thread, claimed),
        and serial."""
        base = self.default_schedule(site, None, m)
        out = [base]
        if m > 1:  # (at m = 1 both products are the same)
            out += [dataclasses.replace(base, dense_fraction=f) for f in (2.0, 0.5) if f != base.dense_fraction]
        bs, lanes = site["block"], self.machine.lanes
        for rt in (2 * lanes, 4 * lanes) if m > 1 else ():
            if rt != base.rows_tile and bs % rt == 0:  # the other width; a narrower one takes a row more
                mt = base.m_tile + (rt < base.rows_tile) - (rt > base.rows_tile)
                out.append(dataclasses.replace(base, rows_tile=rt, m_tile=max(1, min(mt, _max_group_rows(rt, lanes)))))
        if m == 1:
            out.append(dataclasses.replace(base, prefetch=True))
            if base.rows_tile % (2 * lanes) == 0:  # the other number of streams a tile
                out.append(dataclasses.replace(base, streams=3 - base.streams))
        if base.chunks > 1:  # the gate as its own launch, computed by every thread, or claimed; serial
            one = dataclasses.replace(base, claim=False)
            out.append(dataclasses.replace(one, gate_parallel=not base.gate_parallel))
            if base.claim or base.chunks == 2:
                out.append(one if base.claim else dataclasses.replace(base, gate_parallel=False, claim=True))
            out.append(dataclasses.replace(one, chunks=1, gate_parallel=False))
        return out

    def schedule_from_json(self, d: dict) -> DynamicSchedule:
        return DynamicSchedule(**d)

    def estimate_time(self, site: dict, stats, m: int) -> float:
        """The default schedule at ``m`` on the machine model: the union of the rows' selections
        (``1 - (1 - k/n_alive)^m`` of the live tiles for independent rows) and the gate weights
        stream from memory once; per union tile, the row groups it is multiplied for (its rows,
        ``m k / union`` on average, in groups of ``m_tile``, at most the masked dense product's
        ``ceil(m / m_tile)``); the selection is ``O(m N)`` scalar work."""
        shape = self._shape(site)
        sched = self.default_schedule(site, None, m)
        mach, bs, n, lanes = self.machine, shape.block, shape.num_tiles, self.machine.lanes
        n_alive = site.get("n_alive", n)
        union = max(n_alive * (1 - (1 - shape.k / n_alive) ** m), 1.0)
        mt = sched.m_tile
        groups = min(-(-m // mt), math.ceil(m * shape.k / union / mt))
        fmas = union * groups * mt * bs * bs / lanes
        loads = union * groups * bs * (bs / lanes + mt * bs / sched.rows_tile)  # weights + x broadcasts
        gate_fmas = m * -(-n // GATE_ROWS) * GATE_ROWS * shape.in_features / lanes
        t_fma = (max(fmas, loads) + gate_fmas) / mach.vector_fma_rate + union * groups * mach.block_overhead_s
        t_mem = (union * bs * bs + n * shape.in_features + m * (shape.in_features + shape.out_features)) * 4 \
            / mach.bandwidth
        # selection, still priced as the former four-pass radix select (4 passes over n, 4 x 256
        # buckets; the quickselect does about 3n comparisons), and the tile lists
        t_select = m * (4 * n + 4 * 256 + n * shape.nbi) * _SCALAR_S
        return max(t_mem, t_fma) + t_select + mach.call_overhead_s
