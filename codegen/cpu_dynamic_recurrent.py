"""The time loop of a recurrent layer with dynamic block selection, in one CPU kernel.

Per step ``t`` of a gated cell (Hadifar et al. 2020's ``GatedLSTMCell``, and the GRU
form): ``pre = dynamic_linear(h_{t-1})`` -- gate scores of ``h``, top-k selection per
batch row, the selected tiles of ``W_hh`` (:mod:`codegen.cpu_dynamic`'s phases) plus
``b_hh`` -- then the cell update from ``xp[t] + pre`` (``xp``: the input product of every
step, computed before the loop by its own dynamic site). The state stays in the
kernel's buffers across steps; the VM calls the kernel once per sequence instead of
running a loop function with a site call, a cell kernel and allocations per step.

With two chunks the whole loop is one thread-pool launch (as the persistent dense
recurrences of :mod:`codegen.cpu`), two phases a step, each ending at a barrier: every
thread sums the partial gate scores, computes the selection and the tile lists itself (the
same lists: O(N) scalar work) and multiplies the output blocks it claims (``claim``: from
opposite ends, so the faster thread does more; or its range, balanced by predicted work);
then each thread updates its own hidden units and multiplies them into its partial
gate scores for the next step. A pool that must not spin wakes once per sequence, not
once per step. (The gate as a phase of its own, split by gate groups, took a third barrier
a step.)
"""

from __future__ import annotations

import dataclasses
import functools

import tvm
from tvm.script import tirx as T

from bscompile.codegen.claim import clear_flags, flag_slots
from bscompile.codegen.cpu_dynamic import (DynamicGenerator, DynamicSchedule, default_schedule,
                                           gate_macro, phases)
from bscompile.codegen.dynamic_layout import GATE_ROWS, DynamicShape, tile_panel
from bscompile.codegen.family import Bucket
from bscompile.codegen.recurrent_cells import GATE_LANES, CellSpec, gate_update, update_lanes

#: Multiply-adds per step (gate + selected tiles) from which the loop runs on two threads in
#: one launch. Per step at batch 1, keep 0.5, serial -> two threads (AMD EPYC, 2 cores, quiet):
#: LSTM 512, 64x64 tiles (655k) 35.3 -> 26.7 us; LSTM 256, 32x32 (196k) 13.6 -> 10.1 us;
#: GRU 128, 32x32 (30k) 2.4 -> 3.4 us (three barriers a step cost more than they split). With two
#: barriers a step (2026-12-07, one process, AVX-512): LSTM 128, 32x32 (41k) 4.0 -> 3.9 us; LSTM 192,
#: 32x32 (101k) 6.8 -> 6.9; LSTM 256, 32x32 (197k) 16.3 -> 10.1: the crossover is near 100k.
PERSISTENT_MIN_WORK = 1 << 16


def dynamic_recurrent_kernel(cell: CellSpec, block: int, k: int, n_alive: int, batch: int, seq: int | None,
                             schedule: DynamicSchedule, lanes: int = GATE_LANES) -> tvm.tirx.PrimFunc:
    """The PrimFunc of one direction (forward) of a gated layer, arguments (float32):

    - ``xp[T, B, G*H]``: the input product of every step, its bias included;
    - ``h0[B, H]``, ``c0[B, H]`` (a GRU ignores ``c0``);
    - ``tiles``, ``gate_w``, ``gate_b``, ``bias``: ``W_hh`` ``[G*H, H]``, its gate and ``b_hh`` packed as
      for :func:`codegen.cpu_dynamic.dynamic_linear_kernel` (panel = ``tile_panel([schedule])``);
    - outputs ``y[T, B, H]``, ``h_T``, ``c_T`` (a GRU's ``c_T`` is ``c0``).

    ``seq`` is the static number of steps or None (symbolic); the batch is static.
    ``k``, ``n_alive``: as for the dynamic site. The gate order is ``cell.gate_order``; the cell
    update takes ``lanes`` units at a time.
    """
    return _kernel(cell, DynamicShape(cell.hidden, cell.num_gates * cell.hidden, block, k), n_alive, batch, seq,
                   schedule, lanes)


@functools.lru_cache(maxsize=32)
def _kernel(cell: CellSpec, shape: DynamicShape, n_alive: int, batch: int, seq_static: int | None,
            sched: DynamicSchedule, lanes: int) -> tvm.tirx.PrimFunc:
    hid, gh, bs = cell.hidden, shape.out_features, shape.block
    nbi, nbo = shape.nbi, shape.nbo
    panel = tile_panel([sched])
    npan = bs // panel
    tile_shape = (nbo, nbi, bs, bs) if npan == 1 else (nbo, nbi, npan, bs, panel)
    seq = seq_static if seq_static is not None else tvm.tirx.Var("seq", "int32")
    ph = phases(shape, batch, sched, n_alive, panel)
    ng, chunks = ph.ng, sched.chunks
    step = gate_update(cell)
    clear_taken = clear_flags(nbo)

    @T.macro
    def chunk_blocks(tiles, h, bias, pre, acc, lrow, lscale, utile, ugroups, ucnt, bounds, extra):
        ph.product(tiles, h, bias, pre, acc, lrow, lscale, utile, ugroups, ucnt, bounds[extra[0]], bounds[extra[0] + 1])

    # selection, lists and the output blocks of chunk ch (``extra = (ch, taken, step + 1)``), or
    # under ``claim`` those thread ch claims: ``pre = W_hh[selected] h + b_hh``
    claim = sched.claim and chunks == 2
    chunk = ph.with_lists(ph.claim_blocks if claim else chunk_blocks, hoisted=True)

    # Two or more chunks: thread ``ch`` owns the hidden units [u0, u1) (whole vectors of the
    # update). After updating them it multiplies them into its partial gate scores
    # ``gp[ch] = Wg[:, u0:u1] h[u0:u1]`` (its half of the gate weights, with h still in L1); the
    # next step starts from ``gp[0] + gp[1] + bg``, summed by each thread into its own scores.
    per = -(-hid // lanes // chunks) * lanes
    gate_range = gate_macro(None, 1, bias=False)  # the dynamic site's gate over a run-time range of inputs

    @T.macro
    def gate_part(h, gate_w, gate_b, gp, ch):
        u0 = T.Bind(T.min(ch * per, hid))
        gp_own = T.decl_buffer((batch, ng * GATE_ROWS), "float32", data=gp.data,
                               elem_offset=ch * batch * ng * GATE_ROWS)
        for grp in T.serial(ng):
            gate_range(h, gate_w, gate_b, gp_own, grp, 0, batch, u0, T.min(u0 + per, hid) - u0)

    @T.macro
    def update_part(xp, pre, h, c, peep, y, t, ch):
        u0 = T.Bind(T.min(ch * per, hid))
        n = T.Bind(T.min(u0 + per, hid) - u0)
        for b in T.serial(batch):
            for jo in T.serial(n // lanes):
                for ji in T.vectorized(lanes):
                    step(xp, pre, h, c, peep, y, b, u0 + jo * lanes + ji, t, 0)
            for jt in T.serial(n % lanes):
                step(xp, pre, h, c, peep, y, b, u0 + n - n % lanes + jt, t, 0)

    @T.macro
    def scores(gp, gate_b, g_own):
        """g_own = sum of the chunks' partial scores + bg."""
        for b in T.serial(batch):
            for n in T.serial(ng):
                for v in T.vectorized(GATE_ROWS):
                    g_own[b, n * GATE_ROWS + v] = gate_b[n * GATE_ROWS + v] + gp[0, b, n * GATE_ROWS + v]
                for cc in T.serial(chunks - 1):
                    for v in T.vectorized(GATE_ROWS):
                        g_own[b, n * GATE_ROWS + v] = g_own[b, n * GATE_ROWS + v] + gp[cc + 1, b, n * GATE_ROWS + v]

    @T.macro
    def one_step(xp, tiles, gate_w, gate_b, bias, h, c, g, pre, peep, sf, si, y, t):
        """One thread: the gate, selection, lists and product, the update."""
        for grp in T.serial(ng):
            ph.gate_group(h, gate_w, gate_b, g, grp)
        chunk(g, tiles, h, bias, pre, (0,), sf, si, 0)
        update_part(xp, pre, h, c, peep, y, t, 0)

    @T.macro
    def parallel_step(xp, tiles, gate_w, gate_b, bias, h, c, gp, gs, taken, pre, peep, sf, si, y, t):
        """Two phases, each ending at a barrier: scores, selection, lists and the chunk's output
        blocks (or the blocks it claims); then the chunk's units of the update and their partial
        gate scores for the next step."""
        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
            for ch in T.parallel(chunks):
                g_own = T.decl_buffer((batch, ng * GATE_ROWS), "float32", data=gs.data,
                                      elem_offset=ch * batch * ng * GATE_ROWS)
                scores(gp, gate_b, g_own)
                chunk(g_own, tiles, h, bias, pre, (ch, taken, t + 1), sf, si, ch)
        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
            for ch in T.parallel(chunks):
                update_part(xp, pre, h, c, peep, y, t, ch)
                gate_part(h, gate_w, gate_b, gp, ch)

    @T.prim_func(s_tir=True)
    def dynamic_recurrence(xp_h: T.handle, h0: T.Buffer((batch, hid), "float32"),
                           c0: T.Buffer((batch, hid), "float32"), tiles_in: T.Buffer(tile_shape, "float32"),
                           gate_w: T.Buffer((ng, hid, GATE_ROWS), "float32"),
                           gate_b: T.Buffer((ng * GATE_ROWS,), "float32"), bias: T.Buffer((gh,), "float32"),
                           y_h: T.handle, h: T.Buffer((batch, hid), "float32"),
                           c: T.Buffer((batch, hid), "float32")):
        T.func_attr({"tir.noalias": True})
        xp = T.match_buffer(xp_h, (seq, batch, gh), "float32")
        y = T.match_buffer(y_h, (seq, batch, hid), "float32")
        tiles = T.decl_buffer((nbo, nbi, npan, bs, panel), "float32", data=tiles_in.data)
        pre = T.alloc_buffer((batch, gh), "float32")
        peep = T.alloc_buffer((3 * hid,), "float32")
        sf = T.alloc_buffer((chunks, ph.scratch["float32"]), "float32")  # the threads' lists
        si = T.alloc_buffer((chunks, ph.scratch["int32"]), "int32")
        for j in T.serial(3 * hid):
            peep[j] = T.float32(0)
        for b in T.serial(batch):
            for j in T.serial(hid):
                h[b, j] = h0[b, j]
                c[b, j] = c0[b, j]
        if chunks > 1:
            gp = T.alloc_buffer((chunks, batch, ng * GATE_ROWS), "float32")  # partial gate scores
            gs = T.alloc_buffer((chunks * batch * ng * GATE_ROWS,), "float32")  # each chunk's summed scores
            taken = T.alloc_buffer((flag_slots(nbo),), "int32")  # claimed output blocks: the step + 1
            clear_taken(taken)
            with T.attr(0, "pragma_parallel_launch_point", 1):
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for ch in T.parallel(chunks):
                        gate_part(h, gate_w, gate_b, gp, ch)
                for t in T.serial(seq):
                    parallel_step(xp, tiles, gate_w, gate_b, bias, h, c, gp, gs, taken, pre, peep, sf, si, y, t)
        else:
            g = T.alloc_buffer((batch, ng * GATE_ROWS), "float32")
            for t in T.serial(seq):
                one_step(xp, tiles, gate_w, gate_b, bias, h, c, g, pre, peep, sf, si, y, t)

    return dynamic_recurrence.without_attr("global_symbol")


class DynamicRecurrentGenerator(DynamicGenerator):
    """The ``dynamic_recurrent`` kind on LLVM CPUs: :func:`dynamic_recurrent_kernel`.

    The batch is static (one bucket), the sequence length may be symbolic. Schedules are the
    dynamic site's at ``m`` = the batch; the cost is per step (the length is unknown)."""

    symbolic_m = True  # (the sequence length; the batch, the site's m, is static)

    def kernel(self, site: dict, mats: list, buckets: list[Bucket]) -> tvm.tirx.PrimFunc:
        seq = site["seq"] if isinstance(site["seq"], int) else None
        return dynamic_recurrent_kernel(CellSpec.from_json(site["cell"]), site["block"], site["k"], site["n_alive"],
                                        site["m"], seq, buckets[0].schedules[0], update_lanes(self.machine.lanes))

    def default_schedule(self, site: dict, stats, m: int) -> DynamicSchedule:
        """The dynamic site's register tiles at ``m``; two chunks from :data:`PERSISTENT_MIN_WORK`
        multiply-adds a step (the pool wakes once per sequence, not per step), which claim their
        output blocks; at batch 1 with AVX-512 each tile read as two streams (``DynamicSchedule.streams``)."""
        shape = self._shape(site)
        sched = default_schedule(shape, m, self.machine.lanes)
        work = m * (shape.in_features * shape.num_tiles + shape.k * shape.block ** 2)
        chunks = 2 if work >= PERSISTENT_MIN_WORK and shape.nbo > 1 else 1
        return dataclasses.replace(sched, chunks=chunks, gate_parallel=False, claim=chunks == 2)

    def schedule_space(self, site: dict, mat, m: int) -> list[DynamicSchedule]:
        """The default, the other number of chunks (one launch on two threads, or serial), the
        blocks split by predicted work instead of claimed, and one stream a tile."""
        base = self.default_schedule(site, None, m)
        out = [base, dataclasses.replace(base, chunks=3 - min(base.chunks, 2), claim=base.chunks == 1)]
        if base.claim:
            out.append(dataclasses.replace(base, claim=False))
        if base.streams > 1:
            out.append(dataclasses.replace(base, streams=1))
        return out
