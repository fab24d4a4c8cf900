"""TIR kernels for LLVM CPU targets (x86 AVX2/AVX-512 and aarch64 NEON).

All matrix work goes through one block-row micro-kernel: for block row ``ib`` it
keeps an ``m_tile x r`` accumulator tile in registers, walks the row's non-zero
blocks, and for each column ``kk`` of a block does ``acc[m, :] += blk[kk, :] * x[m, col+kk]``
vectorised over the ``r`` rows of the block (variants: over whole blocks, over the batch,
and for small batch-1 recurrences straight-line code for the weight's own pattern). The
same code is the dense kernel (one full-width block per block row, see
:meth:`BSRMatrix.dense`), the block-sparse kernel, and the recurrent mat-vec inside the
time loop of GRU/LSTM/RNN layers.

Two facts about TVM's LLVM backend shape the code:
- accumulators are small ``global`` allocations and scalars are ``T.Bind`` lets; a
  ``local``-scope tile or a ``x: T.int32 = buf[i]`` binding becomes a workspace
  allocation per tile, 2-5x slower (so does a scalar unpacked by assignment inside a
  macro, ``a, b = args[0], args[1]``: pass operands as macro arguments);
- ``T.parallel`` inside a serial loop is one thread-pool launch per iteration, which
  is how the recurrent kernels parallelise each time step.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from bscompile.codegen.claim import claimed_launch
from bscompile.codegen.cpu_cost import KernelShape, MachineModel, estimate_time
from bscompile.codegen.cpu_dynamic import DynamicGenerator
from bscompile.codegen.cpu_dynamic_recurrent import DynamicRecurrentGenerator
from bscompile.codegen.family import Bucket, Cases, Generator, KernelFamily, dispatch, pick, static_dim
from bscompile.codegen.layout import BlockShape, BlockStats, BSRMatrix, LayoutKey
from bscompile.codegen.recurrent_cells import GATE_LANES, CellSpec, gate_update, update_lanes


@dataclass(frozen=True)
class CpuSchedule:
    """How a block-row kernel is laid out on the CPU."""

    m_tile: int  # batch rows sharing one pass over a block row's weights (rows variant)
    parallel: bool  # parallelise over block rows
    unroll_c: bool  # fully unroll the columns of a block (small blocks)
    #: "rows": vectorise over a block's rows (blocks at least a vector high);
    #: "block": over a whole r x c block against x's columns repeated r times (short blocks, small batch);
    #: "batch": over batch rows (short blocks, batch >= a vector);
    #: "unrolled": "block" generated for the weight's own sparsity pattern (batch-1 recurrences)
    variant: str = "rows"
    m_vec: int = 8  # batch rows per vector tile (batch variant)
    #: recurrent kernels at batch 1: one thread-pool launch for the whole sequence, the
    #: threads meeting at a barrier after each step's mat-vec and after its gate update
    #: (a launch per step costs more than the step below ~1M multiply-adds)
    persistent: bool = False
    #: with ``parallel``: two threads claim chunks of block rows from opposite ends
    #: (:mod:`codegen.claim`) instead of splitting them statically: the caller starts at once
    #: and a worker that wakes late takes only what is left
    claim: bool = False

    def to_json(self) -> dict:
        d = {"m_tile": self.m_tile, "parallel": self.parallel, "unroll_c": self.unroll_c,
             "variant": self.variant, "m_vec": self.m_vec}
        return d | {k: True for k in ("persistent", "claim") if getattr(self, k)}


#: Vector registers worth of accumulators a tile may use (x86 has 16 ymm, NEON 32 q).
_ACC_REGISTERS = 12
#: Multiply-adds below which a kernel runs on one thread (see :func:`schedule_for`).
#: Waking the non-spinning pool costs ~30 us here. 2 threads vs 1, linear 90% 4x4, quiet
#: host (2026-12-05), median us: 1760^2 batch 4 (1.2M) 45 vs 36, batch 8 (2.5M) 92 vs 84,
#: batch 16 (5M) 97 vs 88, batch 32 (10M) 128 vs 116; 3072^2 batch 4 (3.8M) 127 vs 120,
#: batch 8 (7.5M) 155 vs 237; the char GRU's 256->768 projection over 50 rows (1M) 49 vs
#: ~39. Ties above 4M: those kernels' tuning records decide (`bscompile tune`).
PARALLEL_MIN_WORK = 1 << 22
#: Stored weights (elements) from which a kernel runs on the pool whatever its work: it is
#: bandwidth-bound and two cores read faster (7680x2560 90% batch 1, 2M weights: 67 us on
#: 2 threads, 99 us on 1).
PARALLEL_MIN_WEIGHTS = 1 << 20
#: Multiply-adds per step from which a batch-1 recurrence runs persistent on the pool.
#: Serial step -> persistent step, 2 threads, quiet host (2026-12-05, GRUs at 10% 4x4 unless
#: said): 786k (dense 64->512) 1.99 -> 1.04 ms / 64 steps; 461k (dense 392) 1.10 -> 0.49;
#: 315k (512->1024) 0.93 -> 0.56 ms / 50 steps; 79k (256->512) 0.25 -> 0.20; 44k (192->384)
#: 0.16 -> 0.16 (noisy); 20k (128->256) 0.09 -> 0.21; 5k 0.04 -> 0.16: two barriers a step
#: cost ~2-3 µs, worth it from ~50k multiply-adds.
PERSISTENT_MIN_WORK = 1 << 16
#: Stored blocks up to which a batch-1 recurrent mat-vec runs "unrolled": straight-line code for
#: its weight's own pattern, every offset a constant (no index loads, no loop per block row).
#: GRU recurrences at 90% 4x4, 50 steps, "block" -> "unrolled" (2026-12-07): hidden 128 (~300
#: blocks) 31 -> 22 us, the char GRU's 256 (1229) 82 -> 56 us, 448 (3760) 307 -> 196 us. Code
#: grows ~17 bytes a block; above this the mat-vec is big enough to run persistent on the pool.
UNROLL_MAX_BLOCKS = 4096
#: Block rows per straight-line chunk of an "unrolled" mat-vec; the chunks are the cases of a
#: run-time loop. As one straight line, LLVM hoisted the weight loads out of the time loop and
#: kept every replicated-x vector live across the step, spilling both: in the model's build the
#: char GRU recurrence took 80.6 us, in chunks of 8 / 16 / 32 / 64 rows 56 / 59 / 61 / 63 us.
UNROLL_CHUNK_ROWS = 8
#: Chunks of block rows a batch-variant kernel splits into (a multiple of any thread count here).
_PARALLEL_CHUNKS = 4
#: Elements of x below which the batch variant transposes it on one thread.
_PARALLEL_TRANSPOSE = 1 << 17


def default_schedule(mat: BSRMatrix, m: int, vector_lanes: int = 8, recurrent: bool = False,
                     cores: int = 0) -> CpuSchedule:
    return schedule_for(mat.block, mat.nnz_blocks, mat.num_block_rows, m, vector_lanes, recurrent, cores)


def _tile(m: int, regs_per_row: int, limit: int = 8) -> int:
    """The largest divisor of ``m`` whose accumulators fit the register budget."""
    cap = max(1, min(limit, _ACC_REGISTERS // regs_per_row))
    return max(d for d in range(1, cap + 1) if m % d == 0)


#: Block heights up to which the default vectorises over whole blocks ("block") rather than
#: over the block's rows: beyond, a block row fills half a vector or more and "rows" wins.
#: 1760x1760 90%, AVX-512 (16 lanes), one thread, us, "block" vs "rows" (2026-12-07): 8x8
#: batch 1 24.5 vs 17.2, batch 4 72 vs 34; 8x4 24 vs 17 / 59 vs 36; 8x16 23 vs 16 / 79 vs 32;
#: 8x2 25 vs 18 / 60 vs 38; but 4x8 21 vs 24 / 52 vs 61, 4x4 23 vs 24 / 53 vs 65, 2x8 21 vs 47 /
#: 45 vs 115. AVX2 (8 lanes), 4x4: 24 vs 24 / 58 vs 89; 4x8 21 vs 25 / 54 vs 63.
BLOCK_VARIANT_MAX_ROWS = 4


def block_vector_ok(block: BlockShape, vector_lanes: int) -> bool:
    """Whether the "block" variant applies: a short block of half a vector to 8 vectors."""
    rc = block.r * block.c
    return block.r < vector_lanes and vector_lanes // 2 <= rc <= 8 * vector_lanes and rc % (vector_lanes // 2) == 0


def unrolled_ok(block: BlockShape, nnz_blocks: int, vector_lanes: int) -> bool:
    """Whether a batch-1 recurrent mat-vec of this layout may run "unrolled" (serial, on one thread):
    blocks the default runs as "block", few enough for straight-line code."""
    return block_vector_ok(block, vector_lanes) and block.r <= BLOCK_VARIANT_MAX_ROWS \
        and nnz_blocks <= UNROLL_MAX_BLOCKS


def schedule_for(block: BlockShape, nnz_blocks: int, num_block_rows: int, m: int,
                 vector_lanes: int = 8, recurrent: bool = False, cores: int = 0) -> CpuSchedule:
    """The default schedule, from block statistics alone (the cost model uses it too).

    Blocks of half a vector's height or more are vectorised over their rows with an M tile
    that keeps accumulators in registers. Shorter blocks would leave lanes idle that way:
    once the batch fills a vector they are vectorised over the batch (linear layers),
    otherwise (up to :data:`BLOCK_VARIANT_MAX_ROWS` high) over the whole block against
    ``x``'s columns repeated to the block's layout (also inside recurrent kernels, whose
    mat-vec has no transposed ``x``; small batch-1 ones "unrolled"). On ``cores`` = 2 (0: not
    known) a parallel linear kernel's two threads claim its block rows (:func:`claimed`).
    """
    return claimed(_schedule_for(block, nnz_blocks, num_block_rows, m, vector_lanes, recurrent), recurrent, cores)


def claimed(sched: CpuSchedule, recurrent: bool, cores: int) -> CpuSchedule:
    """``sched`` with ``claim`` where it pays: a parallel linear kernel on two cores (claiming
    uses two threads; a recurrent kernel's steps keep their split: a persistent one meets at
    barriers, and its flags would be per thread)."""
    return dataclasses.replace(sched, claim=sched.parallel and not recurrent and cores == 2)


def _schedule_for(block: BlockShape, nnz_blocks: int, num_block_rows: int, m: int, vector_lanes: int,
                  recurrent: bool) -> CpuSchedule:
    weights = nnz_blocks * block.r * block.c
    work = weights * m
    # Waking a sleeping thread pool costs tens of microseconds (pools must not spin on
    # shared cores): parallelise only kernels well above that.
    parallel = (work >= PARALLEL_MIN_WORK or weights >= PARALLEL_MIN_WEIGHTS) and num_block_rows > 1
    unroll = block.c <= 32
    if not recurrent and m >= vector_lanes and block.r < vector_lanes and block.c <= 64:
        # Two vectors of batch rows per tile, also on AVX-512: one (16 rows) made the char GRU's
        # small one-thread products 5-20% faster, but the kernel grid's m = 64 cells 1.3-1.7x
        # slower (the weights stream once per tile; 2026-12-07). `bscompile tune` measures both.
        m_vec = 2 * vector_lanes if block.r <= 4 and m >= 2 * vector_lanes else vector_lanes
        return CpuSchedule(1, parallel, unroll, "batch", m_vec)
    persistent = recurrent and m == 1 and work >= PERSISTENT_MIN_WORK and num_block_rows > 1
    parallel = parallel or persistent
    if recurrent and m == 1 and not parallel and unrolled_ok(block, nnz_blocks, vector_lanes):
        return CpuSchedule(1, False, True, "unrolled")
    if block_vector_ok(block, vector_lanes) and block.r <= BLOCK_VARIANT_MAX_ROWS:
        return CpuSchedule(_tile(m, -(-block.r * block.c // vector_lanes)), parallel, True, "block",
                           persistent=persistent)
    return CpuSchedule(m_tile=_tile(m, -(-block.r // vector_lanes)), parallel=parallel, unroll_c=unroll,
                       persistent=persistent)


def accumulator_chains(mat: BSRMatrix, sched: CpuSchedule, lanes: int = 8) -> int:
    """Independent accumulators per (row, vector): enough FMAs in flight to cover latency.

    About 8 FMAs must be in flight (2 units x 4 cycles); ``m_tile`` rows and the
    vectors of a block row already give ``m_tile * ceil(r / lanes)`` chains. The
    count divides the block width so each chain owns whole columns.
    """
    vecs = -(-mat.block.r // lanes)
    want = max(1, 8 // (sched.m_tile * vecs))
    return max(d for d in range(1, min(want, mat.block.c) + 1) if mat.block.c % d == 0)


def _store_macro(r: int, mt: int, n_limit: int | None, total):
    """``y[m0 + mm, col0 + row + rr] = total(acc, bias, row, mm, rr)`` for an ``mt x r`` tile:
    vectorised over ``rr``, or guarded per row when N is not a multiple of the block height."""
    if n_limit is None:

        @T.macro
        def store(y, acc, bias, m0, col0, row):
            for mm in T.unroll(mt):
                for rr in T.vectorized(r):
                    y[m0 + mm, col0 + row + rr] = total(acc, bias, row, mm, rr)

        return store

    @T.macro
    def store_guarded(y, acc, bias, m0, col0, row):
        for mm in T.unroll(mt):
            for rr in T.serial(r):
                if row + rr < n_limit:
                    y[m0 + mm, col0 + row + rr] = total(acc, bias, row, mm, rr)

    return store_guarded


def _block_row_loops(mat: BSRMatrix, sched: CpuSchedule, k_limit: int | None, n_limit: int | None):
    """The micro-kernel as a TVMScript macro over one block row and one M tile.

    ``k_limit`` clamps reads of ``x`` when K is not a multiple of the block width (the
    weights there are zero padding, so any in-bounds value will do); ``n_limit``
    guards the stores when N is not a multiple of the block height.
    """
    r, c, mt = mat.block.r, mat.block.c, sched.m_tile
    q = accumulator_chains(mat, sched)
    cloop = T.unroll if sched.unroll_c else T.serial

    if k_limit is None:
        def xcol(col, kk):
            return col + kk
    else:
        def xcol(col, kk):
            return T.min(col + kk, k_limit - 1)

    def total(acc, bias, row, m, rr):
        e = bias[row + rr]
        for j in range(q):
            e = e + acc[j, m, rr]
        return e

    store = _store_macro(r, mt, n_limit, total)

    @T.macro
    def block_row(x, data, indices, indptr, bias, y, ib, m0, y_col0):
        # q independent accumulator chains over the block's columns hide FMA latency
        acc = T.alloc_buffer((q, mt, r), "float32")
        for j in T.unroll(q):
            for m in T.unroll(mt):
                for rr in T.vectorized(r):
                    acc[j, m, rr] = T.float32(0)
        for p in range(indptr[ib], indptr[ib + 1]):
            col = T.Bind(indices[p] * c)
            for ko in cloop(c // q):
                for j in T.unroll(q):
                    for m in T.unroll(mt):
                        for rr in T.vectorized(r):
                            acc[j, m, rr] = acc[j, m, rr] + data[p, ko * q + j, rr] * x[m0 + m, xcol(col, ko * q + j)]
        store(y, acc, bias, m0, y_col0, ib * r)

    return block_row


def block_chains(block: BlockShape, sched: CpuSchedule, lanes: int = 8) -> int:
    """Blocks in flight in the "block" variant: independent accumulators hide FMA latency."""
    vecs = -(-block.r * block.c // lanes) * sched.m_tile
    return max(1, min(8 // vecs, _ACC_REGISTERS // vecs))


# --- m: a static int or a symbolic TIR variable --------------------------------------------
#
# Every macro below takes ``m`` (the rows of x: batch x time, or the batch of a recurrent
# step) as a Python int or a ``tirx.Var``; M tiles of ``m_tile`` rows are followed by a tail
# of single rows, which vanishes when m is static and a multiple of the tile.


def _dim(value: int | None, name: str):
    """A kernel dimension: the static int, or a fresh symbolic ``int32`` variable."""
    return value if value is not None else tvm.tirx.Var(name, "int32")


def _has_tail(m, mt: int) -> bool:
    """Whether rows are left after the full M tiles (always possible for a symbolic m)."""
    return not isinstance(m, int) or m % mt != 0


def workspace_size(mat: BSRMatrix, m, sched: CpuSchedule):
    """Floats of scratch a matmul macro needs: ``x`` replicated to the block layout ("block",
    "unrolled") where the block does not divide K, ``x`` transposed into batch tiles ("batch")."""
    k_pad = mat.padded_shape[1]
    if sched.variant in ("block", "unrolled") and not _direct_x(mat):
        return m * (k_pad // mat.block.c) * mat.block.r * mat.block.c
    if sched.variant == "batch":
        return (m + sched.m_vec - 1) // sched.m_vec * sched.m_vec * k_pad
    return 1


#: Chunks of block rows two claiming threads take one at a time (``CpuSchedule.claim``).
CLAIM_ITEMS = 16


def _over_block_rows(nbr: int, sched: CpuSchedule, static_chunks: int, body):
    """A macro ``(args)`` running ``body(lo, hi, *args)`` on ranges of block rows covering all ``nbr``,
    none empty: one range (serial), at most ``static_chunks`` split among the pool's threads
    (``parallel``), or at most :data:`CLAIM_ITEMS` that two threads claim (``claim``). ``body``
    stores whole outputs, so a range done twice by two claiming threads writes the same values
    twice. ``args`` holds the matmul macro's seven operands (its buffers and the output's column
    offset), handed to ``body`` as arguments: unpacked by assignment inside a macro, the offset
    became a TIR variable allocated per iteration (a GRU 512->1024's persistent recurrence took
    1.6x as long) and the buffers were renamed after the macro's names. (``body`` loops
    ``for i in T.serial(hi - lo)``: with ``T.serial(lo, hi)`` inside the parallel loop, the
    kernels built by TVM 0.27 here gave wrong outputs.)"""
    claiming = sched.parallel and sched.claim
    items = min(nbr, CLAIM_ITEMS) if claiming else static_chunks if sched.parallel else 1
    per = -(-nbr // items)
    items = -(-nbr // per)  # no empty range (37 rows in 16 ranges of 3: 13 ranges)

    @T.macro
    def item(i, a):
        body(i * per, i * per + per if items * per == nbr else T.min(i * per + per, nbr),
             a[0], a[1], a[2], a[3], a[4], a[5], a[6])

    if claiming:
        return claimed_launch(items, item)
    loop = T.parallel if sched.parallel else T.serial

    @T.macro
    def split(args):
        for i in loop(items):
            item(i, args)

    return split


def _block_vector_macro(mat: BSRMatrix, m, sched: CpuSchedule, k_limit: int | None, n_limit: int | None):
    """The "block" variant: each stored block is ``r*c`` contiguous lanes (``[c, r]`` order),
    multiplied lane by lane with ``x[m, kb*c : kb*c + c]``, each element repeated ``r`` times
    (one vector load and a shuffle, :func:`_x_lanes`), and summed per row once per block row.
    A 4x4 block is one AVX-512 vector (two AVX2 ones) and one FMA per batch row, where the
    "rows" variant would spend four quarter-empty FMAs and four broadcasts. ``q`` blocks are
    in flight at a time so the FMA chains stay independent.

    The lanes came from a copy of ``x`` replicated to that order (``xrep``, ``r`` times the
    size of ``x``), which is what remains where the block does not divide K (the last block
    column is clamped there). Read with a shuffle instead, 1760x1760 90%-pruned, AVX-512, one
    thread, best of 9 (2026-12-07): 4x4 batch 4 55 -> 38 us and batch 1 22 -> 19; 4x8 batch 4
    54 -> 36, batch 1 21 -> 15; 2x8 and 1x16 within the noise (the 4-row copy of x, 112 KiB at
    K = 1760, left L1 for every block and batch row)."""
    r, c, mt = mat.block.r, mat.block.c, sched.m_tile
    rc, nkb, nbr = r * c, mat.padded_shape[1] // mat.block.c, mat.num_block_rows
    direct = _direct_x(mat)

    def tile(mt: int):
        q = block_chains(mat.block, dataclasses.replace(sched, m_tile=mt))

        def total(acc, bias, row, mm, rr):  # (after the chains are summed into chain 0)
            e = bias[row + rr]
            for kk in range(c):
                e = e + acc[0, mm, kk * r + rr]
            return e

        store = _store_macro(r, mt, n_limit, total)

        if direct:  # (statements built directly: a whole-lanes vector expression, as in "unrolled")
            def blocks(acc, slot, dflat, indices, x, p, m0):
                kb = T.Bind(indices[p])
                for mm in range(mt):
                    cur = tvm.tirx.BufferLoad(acc, [slot, mm, T.Ramp(0, 1, rc)])
                    T.buffer_store(acc, cur + _lanes(dflat, p * rc, rc) * _x_lanes(x, m0 + mm, kb * c, r, c),
                                   [slot, mm, T.Ramp(0, 1, rc)])
        else:
            @T.macro
            def blocks(acc, slot, dflat, indices, xs, p, m0):
                kb = T.Bind(indices[p])
                for mm in T.unroll(mt):
                    for i in T.vectorized(rc):
                        acc[slot, mm, i] = acc[slot, mm, i] + dflat[p * rc + i] * xs[((m0 + mm) * nkb + kb) * rc + i]

        @T.macro
        def run(xs, dflat, indices, indptr, bias, y, y_col0, ib, m0):
            acc = T.alloc_buffer((q, mt, rc), "float32")
            for j in T.unroll(q):
                for mm in T.unroll(mt):
                    for i in T.vectorized(rc):
                        acc[j, mm, i] = T.float32(0)
            p0 = T.Bind(indptr[ib])
            cnt = T.Bind(indptr[ib + 1] - p0)
            for pp in range(cnt // q):
                for j in T.unroll(q):
                    blocks(acc, j, dflat, indices, xs, p0 + pp * q + j, m0)
            for j in T.unroll(q - 1):  # the last blocks on chains of their own too
                if j < cnt % q:
                    blocks(acc, j, dflat, indices, xs, p0 + cnt - cnt % q + j, m0)
            for j in T.unroll(q - 1):  # whole vectors first: one lane sum per row below
                for mm in T.unroll(mt):
                    for i in T.vectorized(rc):
                        acc[0, mm, i] = acc[0, mm, i] + acc[j + 1, mm, i]
            store(y, acc, bias, m0, y_col0, ib * r)

        return run

    full = tile(mt)
    tail = tile(1) if mt > 1 else full
    tail_rows = _has_tail(m, mt)
    replicate = _replicate_macro(mat, m, k_limit)

    @T.macro
    def row_range(lo, hi, xs, dflat, indices, indptr, bias, y, y_col0):
        for ii in T.serial(hi - lo):
            ib = T.Bind(lo + ii)
            for mo in T.serial(m // mt):
                full(xs, dflat, indices, indptr, bias, y, y_col0, ib, mo * mt)
            if tail_rows:
                for mr in T.serial(m % mt):
                    tail(xs, dflat, indices, indptr, bias, y, y_col0, ib, m - m % mt + mr)

    all_rows = _over_block_rows(nbr, sched, nbr, row_range)

    @T.macro
    def matmul(x, work, data, indices, indptr, bias, y, y_col0):
        dflat = T.decl_buffer((data.shape[0] * rc,), "float32", data=data.data)
        # the lanes' source: x itself, or its copy [m, nkb, rc] indexed flat (a view of a
        # run-time-sized buffer would alias it)
        xs = x if direct else work
        if not direct:
            replicate(x, xs)
        all_rows((xs, dflat, indices, indptr, bias, y, y_col0))

    return matmul


def _replicate_macro(mat: BSRMatrix, m, k_limit: int | None):
    """``xrep[m, kb, kk*r + rr] = x[m, kb*c + kk]``: ``x`` in the lane order of the ``[c, r]`` blocks."""
    r, c = mat.block.r, mat.block.c
    rc, nkb = r * c, mat.padded_shape[1] // c
    clamp = (lambda i: i) if k_limit is None else (lambda i: T.min(i, k_limit - 1))

    @T.macro
    def replicate(x, xrep):
        for mm in T.serial(m):
            for kb in T.serial(nkb):
                for kk in T.unroll(c):
                    for rr in T.vectorized(r):
                        xrep[(mm * nkb + kb) * rc + kk * r + rr] = x[mm, clamp(kb * c + kk)]

    return replicate


def _direct_x(mat: BSRMatrix) -> bool:
    """Whether the "block" and "unrolled" variants read ``x`` itself (every block column whole)
    instead of a copy replicated to the block's lane order."""
    return mat.padded_shape[1] == mat.shape[1]


def _x_lanes(x, row, col, r: int, c: int):
    """``x[row, col : col + c]``, each element repeated ``r`` times (the lane order of a ``[c, r]``
    block): one vector load and a shuffle."""
    v = tvm.tirx.BufferLoad(x, [row, T.Ramp(col, 1, c)]) if c > 1 else x[row, col]
    if r == 1:
        return v
    if c == 1:
        return tvm.tirx.Broadcast(v, r)
    return tvm.tirx.Shuffle([v] * r, [i // r for i in range(r * c)])  # (no more lanes out than in)


def _lanes(buf, start: int, n: int):
    """``buf[start : start + n]`` as one vector load (a scalar one for ``n == 1``)."""
    return tvm.tirx.BufferLoad(buf, [T.Ramp(start, 1, n) if n > 1 else start])


def _unrolled_macro(mat: BSRMatrix, sched: CpuSchedule, k_limit: int | None):
    """The "unrolled" variant, batch 1: the "block" variant's arithmetic as straight-line code for
    this weight's own pattern (``mat`` carries its real ``indices``/``indptr``). Each block is one
    vector multiply-add at constant offsets into the data and ``x`` (as :func:`_x_lanes`); a block row's
    ``q`` chains are one expression, summed and reduced per row as in "block". No index is read at
    run time, so the kernel's data buffer has the pattern's static block count. The block rows are
    emitted in chunks, the cases of a run-time loop (see :data:`UNROLL_CHUNK_ROWS`)."""
    r, c = mat.block.r, mat.block.c
    rc = r * c
    q_max = block_chains(mat.block, sched)
    indptr, indices = mat.indptr.tolist(), mat.indices.tolist()
    replicate = _replicate_macro(mat, 1, k_limit)
    direct = _direct_x(mat)

    def emit(dflat, x, xrep, bias, y, y_col0, rows):
        """The stores of block rows ``rows``, emitted into the enclosing TVMScript body (IRBuilder calls)."""
        for ib in rows:
            chains: list = []
            for n, p in enumerate(range(indptr[ib], indptr[ib + 1])):
                xv = _x_lanes(x, 0, indices[p] * c, r, c) if direct else _lanes(xrep, indices[p] * rc, rc)
                term = _lanes(dflat, p * rc, rc) * xv
                if n < q_max:
                    chains.append(term)
                else:
                    chains[n % q_max] = chains[n % q_max] + term
            out = _lanes(bias, ib * r, r)
            if chains:
                total = functools.reduce(lambda a, b: a + b, chains)
                v = tvm.tirx.Var("blk", f"float32x{rc}")
                body = out
                for kk in range(c):  # lanes kk*r .. kk*r + r - 1: column kk of the r rows
                    body = body + tvm.tirx.Shuffle([v], [kk * r + i for i in range(r)])
                out = tvm.tirx.Let(v, total, body)
            T.buffer_store(y, out, [0, T.Ramp(y_col0 + ib * r, 1, r) if r > 1 else y_col0 + ib * r])

    nbr = mat.num_block_rows
    chunks = [range(i, min(i + UNROLL_CHUNK_ROWS, nbr)) for i in range(0, nbr, UNROLL_CHUNK_ROWS)]

    def emit_chunks(dflat, x, xrep, bias, y, y_col0, ch):
        for i, rows in enumerate(chunks):
            with T.If(ch == i):
                with T.Then():
                    emit(dflat, x, xrep, bias, y, y_col0, rows)

    @T.macro
    def matmul(x, work, data, indices, indptr, bias, y, y_col0):
        dflat = T.decl_buffer((data.shape[0] * rc,), "float32", data=data.data)
        if not direct:
            replicate(x, work)
        for ch in T.serial(len(chunks)):
            emit_chunks(dflat, x, work, bias, y, y_col0, ch)

    return matmul


def _batch_macro(mat: BSRMatrix, m, sched: CpuSchedule, n_limit: int):
    """Batch variant: ``x`` is transposed (and zero-padded) into ``xt[K_pad, M_pad]`` so the
    innermost loop runs over ``m_vec`` batch rows: full vectors whatever the block height.
    Per block column: one load of ``x``, ``r`` broadcasts of weights, ``r`` FMAs.

    Each thread-pool launch costs tens of microseconds on a pool that does not spin, so
    the kernel launches once: the parallel loop runs over contiguous chunks of block
    rows (split statically, or claimed: :func:`_over_block_rows`) and each chunk walks the
    batch tiles (keeping one ``xt`` slice hot) itself.
    The transpose is parallel only when it is big enough to pay for its own launch."""
    k = mat.shape[1]
    k_pad = mat.padded_shape[1]
    nbr, r, c, mv = mat.num_block_rows, mat.block.r, mat.block.c, sched.m_vec
    m_pad = (m + mv - 1) // mv * mv
    cloop = T.unroll if sched.unroll_c else T.serial
    full_rows = nbr * r == n_limit  # every block row stores r whole outputs

    def transposer(tloop):
        @T.macro
        def transpose(x, xt):
            for mo in tloop(m_pad // mv):  # row by row: contiguous reads, no div/mod per element
                for mi in T.serial(mv):
                    if mo * mv + mi < m:
                        for kk in T.serial(k):
                            xt[(mo * k_pad + kk) * mv + mi] = x[mo * mv + mi, kk]
                        for kk in T.serial(k_pad - k):
                            xt[(mo * k_pad + k + kk) * mv + mi] = T.float32(0)
                    else:
                        for kk in T.serial(k_pad):
                            xt[(mo * k_pad + kk) * mv + mi] = T.float32(0)

        return transpose

    # The transpose runs in parallel when it is big enough to pay for its own launch:
    # decided here for a static m, at run time for a symbolic one.
    serial_t = transposer(T.serial)
    transpose = serial_t
    if sched.parallel:
        parallel_t = transposer(T.parallel)
        if isinstance(m, int):
            transpose = parallel_t if m_pad * k_pad >= _PARALLEL_TRANSPOSE else serial_t
        else:

            @T.macro
            def transpose(x, xt):
                if m * k_pad >= _PARALLEL_TRANSPOSE:
                    parallel_t(x, xt)
                else:
                    serial_t(x, xt)

    @T.macro
    def row_range(lo, hi, xt, data, indices, indptr, bias, y, y_col0):  # each range walks the batch tiles
        for mo in T.serial(m_pad // mv):
            for ii in T.serial(hi - lo):
                ib = T.Bind(lo + ii)
                acc = T.alloc_buffer((r, mv), "float32")
                for rr in T.unroll(r):
                    for mi in T.vectorized(mv):
                        acc[rr, mi] = T.float32(0)
                for p in range(indptr[ib], indptr[ib + 1]):
                    col = T.Bind(indices[p] * c)
                    for kk in cloop(c):
                        for rr in T.unroll(r):
                            for mi in T.vectorized(mv):
                                acc[rr, mi] = acc[rr, mi] + data[p, kk, rr] * xt[(mo * k_pad + col + kk) * mv + mi]
                if mo * mv + mv <= m:  # a full batch tile: no per-row guard (m tails only)
                    if full_rows:  # a vector of r outputs per row
                        for mi in T.unroll(mv):
                            for rr in T.vectorized(r):
                                y[mo * mv + mi, y_col0 + ib * r + rr] = acc[rr, mi] + bias[ib * r + rr]
                    else:
                        for rr in T.unroll(r):
                            for mi in T.unroll(mv):
                                if ib * r + rr < n_limit:
                                    y[mo * mv + mi, y_col0 + ib * r + rr] = acc[rr, mi] + bias[ib * r + rr]
                else:
                    for rr in T.unroll(r):
                        for mi in T.unroll(mv):
                            if mo * mv + mi < m and ib * r + rr < n_limit:
                                y[mo * mv + mi, y_col0 + ib * r + rr] = acc[rr, mi] + bias[ib * r + rr]

    all_rows = _over_block_rows(nbr, sched, min(nbr, _PARALLEL_CHUNKS), row_range)

    @T.macro
    def matmul(x, work, data, indices, indptr, bias, y, y_col0):
        xt = work  # [m_pad / mv, k_pad, mv], indexed flat: one slice per batch tile
        transpose(x, xt)
        all_rows((xt, data, indices, indptr, bias, y, y_col0))

    return matmul


def _matmul_macro(mat: BSRMatrix, m, sched: CpuSchedule, k_limit: int | None = None,
                  n_limit: int | None = None):
    """``y[:, y_col0 : y_col0 + n_pad] = x @ W.T + bias`` for all block rows.

    The macro's arguments are ``(x, work, data, indices, indptr, bias, y, y_col0)``;
    ``work`` is flat scratch of :func:`workspace_size` floats."""
    if sched.variant == "block":
        return _block_vector_macro(mat, m, sched, k_limit, n_limit)
    if sched.variant == "unrolled":
        if m != 1 or n_limit is not None:
            raise ValueError("the unrolled variant needs batch 1 and whole block rows")
        return _unrolled_macro(mat, sched, k_limit)
    if sched.variant == "batch":
        return _batch_macro(mat, m, sched, mat.shape[0] if n_limit is None else n_limit)
    if sched.variant != "rows":
        raise ValueError(f"schedule variant {sched.variant!r} has no block-row macro")
    mt = sched.m_tile
    block_row = _block_row_loops(mat, sched, k_limit, n_limit)
    tail_row = _block_row_loops(mat, dataclasses.replace(sched, m_tile=1), k_limit, n_limit) if mt > 1 else block_row
    nbr = mat.num_block_rows
    tail_rows = _has_tail(m, mt)

    @T.macro
    def row_range(lo, hi, x, data, indices, indptr, bias, y, y_col0):
        for ii in T.serial(hi - lo):
            ib = T.Bind(lo + ii)
            for mo in T.serial(m // mt):
                block_row(x, data, indices, indptr, bias, y, ib, mo * mt, y_col0)
            if tail_rows:
                for mr in T.serial(m % mt):
                    tail_row(x, data, indices, indptr, bias, y, ib, m - m % mt + mr, y_col0)

    all_rows = _over_block_rows(nbr, sched, nbr, row_range)

    @T.macro
    def matmul(x, work, data, indices, indptr, bias, y, y_col0):
        all_rows((x, data, indices, indptr, bias, y, y_col0))

    return matmul


def _bucketed(mat: BSRMatrix, m, cases: Cases, which: int | None, k_limit=None, n_limit=None):
    """The dispatching matmul macro over ``cases`` (schedule ``sched`` or ``scheds[which]``) and
    the flat workspace size it needs at ``m``. A bucket of one size (``lo == hi``, e.g. m = 1)
    is generated for that static m: the code a shape-specialised kernel runs."""
    scheds = [sc if which is None else sc[which] for _, _, sc in cases]
    ms = [lo if lo == hi else m for lo, hi, _ in cases]  # (the dispatch reaches bucket i only for m > hi_{i-1})
    macros = [_matmul_macro(mat, mi, sc, k_limit, n_limit) for mi, sc in zip(ms, scheds)]
    sizes = [workspace_size(mat, mi, sc) for mi, sc in zip(ms, scheds)]
    return dispatch(m, cases, macros), pick(m, cases, sizes)


def _cases(m: int | None, sched) -> Cases:
    """``sched`` (one schedule, or schedules per matrix) as the cases of a static or symbolic m."""
    if isinstance(sched, tuple) and sched and isinstance(sched[0], tuple) and len(sched[0]) == 3 \
            and isinstance(sched[0][0], int):
        return sched
    return ((m or 1, m, sched),)


def linear_kernel(mat: BSRMatrix, m: int | None, sched) -> tvm.tirx.PrimFunc:
    """``y[M, N] = x[M, K] @ W.T + bias`` with W in ``mat``'s block layout, ``bias[N_pad]``.

    ``m`` is None for a symbolic M; ``sched`` is one :class:`CpuSchedule` or the cases
    ``((lo, hi, schedule), ...)`` a symbolic M dispatches on at run time. The number of
    stored blocks is a symbolic dimension too, so weights of one shape and block layout
    share a kernel (and its parse and LLVM compile).
    """
    cases = _cases(m, sched)
    return _linear_kernel(LayoutKey.of(mat, _unrolled(cases)), m, cases)


def _unrolled(cases: Cases, which: int | None = None) -> bool:
    """Whether any case runs matrix ``which`` (all schedules when None) with the "unrolled" variant."""
    return any((sc if which is None else sc[which]).variant == "unrolled" for _, _, sc in cases)


@functools.lru_cache(maxsize=256)
def _linear_kernel(key: LayoutKey, m_static: int | None, cases: Cases) -> tvm.tirx.PrimFunc:
    mat = key.skeleton()
    n, k = mat.shape
    n_pad, k_pad = mat.padded_shape
    nbr, r, c = mat.num_block_rows, mat.block.r, mat.block.c
    m = _dim(m_static, "m")
    matmul, work_size = _bucketed(mat, m, cases, None, k if k_pad != k else None, n if n_pad != n else None)
    nnzb = _dim(key.static_nnz, "nnzb")

    @T.prim_func(s_tir=True)
    def bsr_linear(x_h: T.handle, data_h: T.handle, indices_h: T.handle,
                   indptr: T.Buffer((nbr + 1,), "int32"), bias: T.Buffer((n_pad,), "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True})
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        data = T.match_buffer(data_h, (nnzb, c, r), "float32")
        indices = T.match_buffer(indices_h, (nnzb,), "int32")
        work = T.alloc_buffer((work_size,), "float32")
        matmul(x, work, data, indices, indptr, bias, y, 0)

    return bsr_linear.without_attr("global_symbol")


def recurrent_kernel(cell: CellSpec, mats: list[BSRMatrix], seq: int | None, batch: int | None,
                     scheds, lanes: int = GATE_LANES) -> tvm.tirx.PrimFunc:
    """One direction of a GRU/LSTM/RNN layer with the time loop inside the kernel.

    Arguments: ``xp[T, B, G*H]`` (input projection incl. its bias), per matrix its
    BSR arrays and recurrent bias, ``h0``, ``c0``, ``seq_lens`` (clamped to ``T``),
    ``peep[3H]``; outputs ``Y[T, B, H]``, ``h_T``, ``c_T``. ``T`` and ``B`` are None when
    symbolic; ``scheds`` are the schedules per matrix, or the cases
    ``((lo, hi, schedules), ...)`` a symbolic ``B`` dispatches on. ``mats[0]`` are the rows
    multiplied by ``h``; a GRU with ``linear_before_reset=0`` has ``mats[1]``, the
    candidate rows, multiplied by ``r * h``. Each step runs the mat-vec over all gates,
    then the gate arithmetic fused in one pass over ``[B, H]``, ``lanes`` units at a time.
    """
    cases = _cases(batch, tuple(scheds))
    if len(mats) == 2:  # no persistent form with a second mat-vec: those steps run on one thread
        cases = tuple((lo, hi, tuple(dataclasses.replace(sc, parallel=False, persistent=False) if sc.persistent
                                     else sc for sc in scs)) for lo, hi, scs in cases)
    keys = tuple(LayoutKey.of(m, _unrolled(cases, i)) for i, m in enumerate(mats))
    return _recurrent_kernel(cell, keys, seq, batch, cases, lanes)


@functools.lru_cache(maxsize=64)
def _recurrent_kernel(cell: CellSpec, keys: tuple[LayoutKey, ...], seq_static: int | None,
                      batch_static: int | None, cases: Cases, lanes: int) -> tvm.tirx.PrimFunc:
    mats = [k.skeleton() for k in keys]
    hid, gates = cell.hidden, cell.num_gates
    gh = gates * hid
    assert len(mats) in (1, 2) and all(len(sc) == len(mats) for _, _, sc in cases)
    seq, batch = _dim(seq_static, "seq"), _dim(batch_static, "batch")
    mv0, ws0 = _bucketed(mats[0], batch, cases, 0)
    g0 = mats[0].padded_shape[0]
    two = len(mats) == 2
    mv1, ws1 = _bucketed(mats[1], batch, cases, 1) if two else (None, 1)
    g1 = mats[1].padded_shape[0] if two else 1
    r0, c0_ = mats[0].block.r, mats[0].block.c
    r1 = mats[1].block.r if two else 1
    c1_ = mats[1].block.c if two else 1
    b0 = mats[0].num_block_rows
    b1 = mats[1].num_block_rows if two else 1
    kp0 = mats[0].padded_shape[1]
    kp1 = mats[1].padded_shape[1] if two else 1
    rev = 1 if cell.reverse else 0
    step = gate_update(cell)
    persistent = cases[0][:2] == (1, 1) and cases[0][2][0].persistent
    n0 = _dim(keys[0].static_nnz, "n0")
    n1 = _dim(keys[1].static_nnz if two else None, "n1")

    if two:  # GRU without linear-before-reset: R_h multiplies r * h, a second mat-vec

        @T.macro
        def reset_phase(xp, g, h, rh, work1, seq_lens, data1, indices1, indptr1, rbias1, t):
            for b in T.serial(batch):
                n_b = T.Bind(T.min(seq_lens[b], seq))
                tt = T.Bind(n_b * rev + t * (1 - 2 * rev) - rev)
                if t < n_b:
                    for j in T.serial(hid):
                        rh[b, j] = cell.f_act(cell.clip_expr(xp[tt, b, hid + j] + g[b, hid + j])) * h[b, j]
            mv1(rh, work1, data1, indices1, indptr1, rbias1, g, g0)

    else:

        @T.macro
        def reset_phase(xp, g, h, rh, work1, seq_lens, data1, indices1, indptr1, rbias1, t):
            T.evaluate(0)

    def gate_phase(gate_rows, tail_rows=T.serial, rows=batch):
        """``tail_rows``: the loop over the units past the last full vector. Inside a persistent
        launch every thread runs serial statements, and the update is not idempotent (it
        reads the ``h`` and ``c`` it writes): there the tail must be split among threads too.
        ``rows``: the batch rows of the buffers it is given (1 in the batch-1 branch)."""

        @T.macro
        def update(xp, g, h, c_out, peep, y, seq_lens, t):
            for b in T.serial(rows):
                n_b = T.Bind(T.min(seq_lens[b], seq))
                tt = T.Bind(n_b * rev + t * (1 - 2 * rev) - rev)
                if t < n_b:  # branch outside the lanes so the update vectorises
                    for jo in gate_rows(hid // lanes):
                        for ji in T.vectorized(lanes):
                            step(xp, g, h, c_out, peep, y, b, jo * lanes + ji, tt, g0)
                    for jt in tail_rows(hid % lanes):
                        step(xp, g, h, c_out, peep, y, b, hid - hid % lanes + jt, tt, g0)
                else:
                    for j in T.serial(hid):
                        y[t, b, j] = T.float32(0)

        return update

    # The gate update is parallel over hidden units as the mat-vec is, at batch 1 only: it
    # launches the thread pool once per batch row and step (64 rows: 2.4x slower than serial).
    gates = gate_phase(T.serial)
    if cases[0][2][0].parallel and cases[0][:2] == (1, 1):
        gates = dispatch(batch, ((1, 1), (2, None)), [gate_phase(T.parallel), gates])

    @T.macro
    def serial_steps(xp, h, work0, data0, indices0, indptr0, rbias0, g, rh, work1, seq_lens, data1, indices1,
                     indptr1, rbias1, c_out, peep, y):
        for t in T.serial(seq):
            mv0(h, work0, data0, indices0, indptr0, rbias0, g, 0)
            reset_phase(xp, g, h, rh, work1, seq_lens, data1, indices1, indptr1, rbias1, t)
            gates(xp, g, h, c_out, peep, y, seq_lens, t)

    steps = serial_steps
    if persistent:  # the batch-1 bucket
        mv_p, _ = _bucketed(mats[0], 1, ((1, 1, cases[0][2]),), 0)
        gates_p = gate_phase(T.parallel, T.parallel, 1)

        # Every pool thread runs the time loop; its serial statements (x replicated for the
        # block variant where the block does not divide K, the step's bounds) write identical
        # values. The parallel loops split the step's block rows and hidden units; the barriers
        # order mat-vec (reads h, writes g) -> gate update (reads g, writes h) -> the next step.
        # In this branch the batch is 1: the state, gates and sequence buffers are viewed with
        # a batch of 1 (with a symbolic batch the update's indexing kept its symbolic strides:
        # 6% of a GRU 1024 step)
        @T.macro
        def persistent_steps(xp, h, work0, data0, indices0, indptr0, rbias0, g, rh, work1, seq_lens, data1,
                             indices1, indptr1, rbias1, c_out, peep, y):
            xp1 = T.decl_buffer((seq, 1, gh), "float32", data=xp.data)
            y1 = T.decl_buffer((seq, 1, hid), "float32", data=y.data)
            h1 = T.decl_buffer((1, kp0), "float32", data=h.data)
            c1 = T.decl_buffer((1, hid), "float32", data=c_out.data)
            g1_ = T.decl_buffer((1, g0 + g1), "float32", data=g.data)
            lens1 = T.decl_buffer((1,), "int32", data=seq_lens.data)
            with T.attr(0, "pragma_parallel_launch_point", 1):
                for t in T.serial(seq):
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        mv_p(h1, work0, data0, indices0, indptr0, rbias0, g1_, 0)
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        gates_p(xp1, g1_, h1, c1, peep, y1, lens1, t)

        steps = dispatch(batch, ((1, 1), (2, None)), [persistent_steps, serial_steps])

    @T.prim_func(s_tir=True)
    def recurrence(
        xp_h: T.handle,
        data0_h: T.handle,
        indices0_h: T.handle,
        indptr0: T.Buffer((b0 + 1,), "int32"),
        rbias0: T.Buffer((g0,), "float32"),
        data1_h: T.handle,
        indices1_h: T.handle,
        indptr1: T.Buffer((b1 + 1,), "int32"),
        rbias1: T.Buffer((g1,), "float32"),
        h0_h: T.handle,
        c0_h: T.handle,
        seq_lens_h: T.handle,
        peep: T.Buffer((3 * hid,), "float32"),
        y_h: T.handle,
        h_out_h: T.handle,
        c_out_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        xp = T.match_buffer(xp_h, (seq, batch, gh), "float32")
        h0 = T.match_buffer(h0_h, (batch, hid), "float32")
        c0 = T.match_buffer(c0_h, (batch, hid), "float32")
        seq_lens = T.match_buffer(seq_lens_h, (batch,), "int32")
        y = T.match_buffer(y_h, (seq, batch, hid), "float32")
        h_out = T.match_buffer(h_out_h, (batch, hid), "float32")
        c_out = T.match_buffer(c_out_h, (batch, hid), "float32")
        data0 = T.match_buffer(data0_h, (n0, c0_, r0), "float32")
        indices0 = T.match_buffer(indices0_h, (n0,), "int32")
        data1 = T.match_buffer(data1_h, (n1, c1_, r1), "float32")
        indices1 = T.match_buffer(indices1_h, (n1,), "int32")
        h = T.alloc_buffer((batch, kp0), "float32")
        rh = T.alloc_buffer((batch, kp1), "float32")
        g = T.alloc_buffer((batch, g0 + g1), "float32")
        work0 = T.alloc_buffer((ws0,), "float32")
        work1 = T.alloc_buffer((ws1,), "float32")
        for b in T.serial(batch):
            for j in T.serial(kp0):
                h[b, j] = T.if_then_else(j < hid, h0[b, T.min(j, hid - 1)], T.float32(0))
            for j in T.serial(kp1):
                rh[b, j] = T.float32(0)
            for j in T.serial(hid):
                c_out[b, j] = c0[b, j]
        steps(xp, h, work0, data0, indices0, indptr0, rbias0, g, rh, work1, seq_lens, data1, indices1, indptr1,
              rbias1, c_out, peep, y)
        for b in T.serial(batch):
            for j in T.serial(hid):
                h_out[b, j] = h[b, j]

    return recurrence.without_attr("global_symbol")


class BlockRowGenerator(Generator):
    """The ``linear`` and ``recurrent`` kinds on LLVM CPUs: the block-row kernels above,
    their schedule variants, and the analytical model of :mod:`codegen.cpu_cost`."""

    symbolic_m = True

    def __init__(self, machine: MachineModel, recurrent: bool):
        self.machine, self.recurrent = machine, recurrent

    def kernel(self, site: dict, mats: list[BSRMatrix], buckets: list[Bucket]) -> tvm.tirx.PrimFunc:
        """Dispatches on a symbolic m (or T/B) over ``buckets``; a static m has one bucket."""
        if self.recurrent:
            cases = tuple((b.lo, b.hi, tuple(b.schedules)) for b in buckets)
            return recurrent_kernel(CellSpec.from_json(site["cell"]), mats, static_dim(site["seq"]),
                                    static_dim(site["batch"]), cases, update_lanes(self.machine.lanes))
        return linear_kernel(mats[0], static_dim(site["m"]), tuple((b.lo, b.hi, b.schedules[0]) for b in buckets))

    def default_schedule(self, site: dict, stats: BlockStats, m: int) -> CpuSchedule:
        return schedule_for(stats.block, stats.nnz_blocks, stats.padded_shape[0] // stats.block.r, m,
                            self.machine.lanes, self.recurrent, self.machine.cores)

    def schedule_space(self, site: dict, mat: BSRMatrix, m: int) -> list[CpuSchedule]:
        """The default schedule plus the variants worth trying; recurrent kernels have no
        batch variant (their mat-vec has no transposed ``x``)."""
        lanes = self.machine.lanes
        base = default_schedule(mat, m, lanes, self.recurrent)
        unrolled = self.recurrent and m == 1 and unrolled_ok(mat.block, mat.nnz_blocks, lanes)
        if base.variant == "unrolled":  # the rest of the space is the "block" variant's
            base = CpuSchedule(1, False, True, "block")
        out = [base, dataclasses.replace(base, parallel=not base.parallel, persistent=False)]
        if self.recurrent and m == 1:  # with the above: one launch per sequence, one per step, none
            out.append(dataclasses.replace(base, parallel=True, persistent=not base.persistent))
        if unrolled:
            out.insert(0, CpuSchedule(1, False, True, "unrolled"))
        if not self.recurrent and base.variant == "rows" and m >= lanes and mat.block.c <= 64:
            out.append(CpuSchedule(1, base.parallel, base.unroll_c, "batch", lanes))
        if base.variant == "batch" and m >= 2 * lanes:  # the other tile width: one vector or two
            # (the char GRU's m = 50 products, one thread: one vector 13.0 / 35.4 / 12.1 us, two
            # 16.1 / 39.3 / 12.5; the 2-thread 1760x1760 4x4 at m = 64: 319 vs 336 us)
            out.append(dataclasses.replace(base, m_vec=lanes if base.m_vec == 2 * lanes else 2 * lanes))
        if base.variant != "block" and block_vector_ok(mat.block, lanes):
            out.append(CpuSchedule(_tile(m, -(-mat.block.r * mat.block.c // lanes)), base.parallel, True, "block"))
        if base.variant in ("batch", "block"):  # short blocks: the plain rows variant as the fallback
            out.append(CpuSchedule(max(d for d in range(1, 9) if m % d == 0), base.parallel, base.unroll_c))
        # every parallel variant as the machine's default runs it, and where that claims, split statically too
        out = [claimed(s, self.recurrent, self.machine.cores) for s in out]
        out += [dataclasses.replace(s, claim=False) for s in out if s.claim]
        return list(dict.fromkeys(out))

    def schedule_from_json(self, d: dict) -> CpuSchedule:
        sched = CpuSchedule(**d)
        if sched.claim and self.recurrent:
            raise ValueError("a recurrent kernel's block rows cannot be claimed (its steps split them statically)")
        return sched

    def estimate_time(self, site: dict, stats: BlockStats, m: int) -> float:
        sched = self.default_schedule(site, stats, m)
        block = stats.block
        n, k = site["shape"]
        shape = KernelShape(max(stats.nnz_blocks, 1), block.r, block.c, stats.padded_shape[0] // block.r, m,
                            sched.m_tile, k, n, sched.variant, sched.m_vec, resident=self.recurrent,
                            parallel=sched.parallel and not sched.persistent)
        return estimate_time(shape, self.machine)


class CpuFamily(KernelFamily):
    """LLVM CPU targets (x86 AVX2/AVX-512, aarch64 NEON) on one machine model."""

    name = "cpu"

    def __init__(self, machine: MachineModel):
        self.machine = machine
        self.generators = {"linear": BlockRowGenerator(machine, False), "recurrent": BlockRowGenerator(machine, True),
                           "dynamic_linear": DynamicGenerator(machine),
                           "dynamic_recurrent": DynamicRecurrentGenerator(machine)}
