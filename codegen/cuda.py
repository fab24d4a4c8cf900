"""TIR kernels for CUDA GPUs: block-sparse (and dense) linear layers and recurrent layers.

Same calling conventions as :mod:`codegen.cpu` (see :class:`bscompile.sites.SiteKind`);
:class:`codegen.cuda_family.CudaFamily` bundles the kernels with their schedule space
and the GPU machine model of :mod:`codegen.cuda_cost`.

Linear kernel (``y[M, N] = x[M, K] @ W.T + bias``, W in BSR with blocks stored
transposed, ``data[nnzb, c, r]``): one **warp per block row**, ``warps`` block rows
per thread block (``threadIdx.y``), ``blockIdx.y`` over tiles of ``m_tile`` batch rows.
The 32 lanes of a warp are ``lanes_r x kspl``: ``lanes_r = r / vec`` lanes each own
``vec`` consecutive rows of the block (``vec = 4``: one 128-bit ``float4`` load of the
weights whenever ``r % 4 == 0``), and ``kspl`` lanes split the block row's stored
columns, flattened over all its blocks (``e = p * c + kk``), so even a 4x4 block row
with few blocks keeps all lanes busy and a warp's weight loads are one contiguous,
coalesced 512-byte run. Each lane keeps ``m_tile x vec`` accumulators in registers;
the ``kspl`` partial sums are combined with ``__shfl_down_sync`` (no shared memory),
and lanes ``< lanes_r`` add the bias and store. The activations ``x[m_tile, K]`` are
staged in shared memory once per thread block when they fit (``stage_x``), else read
through the cache with clamped indices. The dense layout (:meth:`BSRMatrix.dense`,
one ``16 x K`` block per block row) runs through the same code.

Recurrent kernel (one direction of a GRU / LSTM / RNN layer): the time loop is a
**host-side loop around kernel launches** (TVM's host/device split puts a ``for t``
that sits outside ``launch_thread`` on the host), with **one fused kernel per step**
(two for a GRU with ``linear_before_reset=0``, whose candidate mat-vec needs the
whole ``r * h`` first). When the hidden size is a multiple of the block height, warp
``jb`` owns hidden units ``[jb r, (jb + 1) r)``: it runs the block rows of *every*
gate for those units (block row ``k H / r + jb`` for gate ``k``), writes the gate
pre-activations to a scratch buffer, ``__syncthreads`` (which also orders the global
writes inside the thread block) and applies the ONNX gate update
(:func:`recurrent_cells.gate_update`) to its own units. ``h`` is double-buffered
(``hv[t % 2]`` is read by every warp's mat-vec, ``hv[(t + 1) % 2]`` written by the
owners), so a step needs no grid-wide barrier beyond the kernel boundary. Otherwise
(hidden not a multiple of the block height) each step is a mat-vec kernel over all
gate rows followed by an element-wise gate-update kernel.

Why not the persistent-RNN kernel (weights held on chip by a single long-running
kernel across all steps)? It needs a grid-wide barrier per step: TVM 0.27 has no
cooperative launch, and a software barrier over co-resident thread blocks can
deadlock when residency is not guaranteed. A one-thread-block persistent kernel is
correct but runs on one SM, and the papers' layers do not fit one SM anyway (GRU
hidden 2304 at 90% sparsity stores 6.4 MB of recurrent weights; an SM has 228 KB of
shared memory). The per-step kernels keep the weights *in L2* across steps instead
(50 MB on an H100, 40 MB on an A100), which is the on-chip reuse that matters at
these sizes; launch overhead (~2-4 us per step) is what is left, and CUDA graphs
(Relax ``RewriteCUDAGraph``) can remove it later.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import tvm
from tvm.script import tirx as T

from bscompile.codegen.cuda_cost import GpuModel, estimate_time
from bscompile.codegen.family import Generator, dispatch, pick, static_dim
from bscompile.codegen.layout import BlockShape, BlockStats, BSRMatrix, LayoutKey
from bscompile.codegen.recurrent_cells import CellSpec, gate_update

WARP = 32
#: Static shared memory a thread block may use without the dynamic opt-in.
SHARED_BYTES = 48 * 1024
#: Most batch rows one warp pass accumulates (m_tile * vec registers per lane).
MAX_M_TILE = 8


@dataclass(frozen=True)
class CudaSchedule:
    """How a block-row kernel is laid out on the GPU."""

    warps: int = 4  # warps (block rows) per thread block
    m_tile: int = 1  # batch rows per warp pass (accumulators per lane = m_tile * vec)
    vec: int = 4  # block rows per lane: 4 = float4 (128-bit) weight loads
    stage_x: bool = True  # stage x[m_tile, K] in shared memory
    #: recurrent sites: the opt-in persistent kernel of :mod:`codegen.cuda_persistent`
    persistent: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CudaSchedule":
        return cls(**{k: d[k] for k in ("warps", "m_tile", "vec", "stage_x", "persistent") if k in d})


def _m_tile(m: int) -> int:
    tiles = -(-m // MAX_M_TILE)
    return -(-m // tiles)


def default_schedule(mat: BSRMatrix, m: int, lanes: int = 8, recurrent: bool = False) -> CudaSchedule:
    """Schedule from the layout alone (``lanes`` and ``recurrent`` matter on CPUs only)."""
    return schedule_for(mat.block, mat.num_block_rows, mat.padded_shape[1], m)


def schedule_for(block: BlockShape, num_block_rows: int, k_pad: int, m: int) -> CudaSchedule:
    """A warp per block row, 128-bit loads where the block height allows, ``x`` staged when it fits."""
    vec = math.gcd(block.r, 4)
    mt = _m_tile(m)
    stage = mt * k_pad * 4 <= SHARED_BYTES
    warps = 4 if num_block_rows >= 256 else 2 if num_block_rows >= 64 else 1
    return CudaSchedule(warps=warps, m_tile=mt, vec=vec, stage_x=stage)


def _lane_split(r: int, vec: int) -> tuple[int, int]:
    """``(lanes_r, kspl)``: lanes over a block's rows and over its columns (a power of two)."""
    if r % vec:
        raise ValueError(f"vec {vec} does not divide block height {r}")
    lanes_r = r // vec
    if lanes_r > WARP:
        raise ValueError(f"block height {r} needs {lanes_r} lanes of {vec} rows; at most {WARP}")
    kspl = 1 << int(math.log2(WARP // lanes_r))
    return lanes_r, kspl


def _warp_block_row(r: int, c: int, vec: int, mt: int, xget):
    """Warp-level macro: ``acc[mm, v]`` of lane ``(ks, rq)`` = partial sums of block row ``ib``.

    After the shuffle reduction lanes ``< lanes_r`` hold the full sums of rows
    ``ib * r + rq * vec + v`` for batch rows ``m0 + mm``.
    """
    lanes_r, kspl = _lane_split(r, vec)
    offsets = []
    off = kspl // 2
    while off >= 1:
        offsets.append(off * lanes_r)
        off //= 2
    active = lanes_r * kspl
    off0 = offsets[0] if offsets else 0  # kspl == 1 (32 lanes over a block's rows): no reduction

    @T.macro
    def block_row(xsrc, data, indices, indptr, ib, m0, lane, acc, w):
        for mm in T.unroll(mt):
            for v in T.vectorized(vec):
                acc[mm, v] = T.float32(0)
        if lane < active:
            start = T.Bind(indptr[ib])
            cnt = T.Bind((indptr[ib + 1] - start) * c)
            for it in T.serial((cnt + (kspl - 1)) // kspl):
                e = T.Bind(it * kspl + lane // lanes_r)
                if e < cnt:
                    p = T.Bind(start + e // c)
                    kk = T.Bind(e % c)
                    col = T.Bind(indices[p] * c + kk)
                    for v in T.vectorized(vec):
                        w[v] = data[p, kk, (lane % lanes_r) * vec + v]
                    for mm in T.unroll(mt):
                        xv = T.Bind(xget(xsrc, m0 + mm, col))
                        for v in T.vectorized(vec):
                            acc[mm, v] = acc[mm, v] + w[v] * xv
        for o in T.unroll(len(offsets)):
            for mm in T.unroll(mt):
                for v in T.unroll(vec):
                    acc[mm, v] = acc[mm, v] + T.tvm_warp_shuffle_down(
                        T.uint32(0xFFFFFFFF), acc[mm, v], T.int32(off0) >> o, WARP, WARP)

    return block_row, lanes_r


def _stage_macro(mt: int, k: int, k_pad: int, m: int, threads: int):
    """All threads of a block copy ``x[m0 : m0 + mt, :K]`` into ``xs`` (zero-padded)."""
    total = mt * k_pad
    iters = -(-total // threads)

    @T.macro
    def stage(xs, x, m0, tid):
        for i in T.serial(iters):
            idx = T.Bind(i * threads + tid)
            if idx < total:
                row = T.Bind(idx // k_pad)
                kk = T.Bind(idx % k_pad)
                xs[row, kk] = T.if_then_else(
                    m0 + row < m and kk < k, x[T.min(m0 + row, m - 1), T.min(kk, k - 1)], T.float32(0))
        T.tvm_storage_sync("shared")

    return stage


def linear_kernel(mat: BSRMatrix, m: int | None, sched: CudaSchedule | tuple) -> tvm.tirx.PrimFunc:
    """``y[M, N] = x[M, K] @ W.T + bias`` with W in ``mat``'s block layout, ``bias[N_pad]``.

    ``m`` is the number of rows, or None for a symbolic one; ``sched`` one schedule, or the
    cases ``((lo, hi, schedule), ...)`` of the m buckets: each bucket is its own launch
    (its ``m_tile`` fixes the grid), picked on the host by an if-chain on m. The number
    of stored blocks is symbolic, as on the CPU.
    """
    cases = sched if isinstance(sched, tuple) else ((1, None, sched),)
    return _linear_kernel(LayoutKey.of(mat), m, cases)


@functools.lru_cache(maxsize=256)
def _linear_kernel(key: LayoutKey, m_static: int | None, cases: tuple) -> tvm.tirx.PrimFunc:
    mat = key.skeleton()
    n, k = mat.shape
    n_pad, k_pad = mat.padded_shape
    nbr, r, c = mat.num_block_rows, mat.block.r, mat.block.c
    m = m_static if m_static is not None else tvm.tirx.Var("m", "int32")
    if m_static is not None:  # a static m runs its own bucket's schedule only
        cases = (pick(m_static, cases, cases),)

    def launch(sched: CudaSchedule, m_hint: int):
        # a schedule from elsewhere (a tuning record, a hand-written JSON) is made legal here
        mt = max(1, min(sched.m_tile, m_hint))
        vec, warps = math.gcd(r, max(sched.vec, 1)), max(1, min(sched.warps, 1024 // WARP))
        stage_x = sched.stage_x and mt * k_pad * 4 <= SHARED_BYTES
        mtiles = (m + mt - 1) // mt
        gx = -(-nbr // warps)
        threads = warps * WARP
        if stage_x:
            def xget(xs, row, col):
                return xs[row, col]
        else:
            def xget(xg, row, col):
                return xg[T.min(row, m - 1), T.min(col, k - 1)]
        block_row, lanes_r = _warp_block_row(r, c, vec, mt, xget)
        stage = _stage_macro(mt, k, k_pad, m, threads)
        stage_rows, stage_cols = (mt, k_pad) if stage_x else (1, 1)

        @T.macro
        def store(y, bias, acc, ib, m0, lane):
            if lane < lanes_r:
                for mm in T.unroll(mt):
                    for v in T.unroll(vec):
                        row = T.Bind(ib * r + lane * vec + v)
                        if m0 + mm < m and row < n:
                            y[m0 + mm, row] = acc[mm, v] + bias[row]

        @T.macro
        def body(x, data, indices, indptr, bias, y, bx, by, ty, tx):
            acc = T.alloc_buffer((mt, vec), "float32", scope="local")
            w = T.alloc_buffer((vec,), "float32", scope="local")
            ib = T.Bind(bx * warps + ty)
            if stage_x:
                xs = T.alloc_buffer((stage_rows, stage_cols), "float32", scope="shared")
                stage(xs, x, by * mt, ty * WARP + tx)
                if ib < nbr:
                    block_row(xs, data, indices, indptr, ib, 0, tx, acc, w)
                    store(y, bias, acc, ib, by * mt, tx)
            else:
                if ib < nbr:
                    block_row(x, data, indices, indptr, ib, by * mt, tx, acc, w)
                    store(y, bias, acc, ib, by * mt, tx)

        @T.macro
        def run(x, data, indices, indptr, bias, y):
            for bx in T.thread_binding(gx, thread="blockIdx.x"):
                for by in T.thread_binding(mtiles, thread="blockIdx.y"):
                    for ty in T.thread_binding(warps, thread="threadIdx.y"):
                        for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                            body(x, data, indices, indptr, bias, y, bx, by, ty, tx)

        return run

    # one launch per bucket, picked on the host by an if-chain on m
    run_all = dispatch(m, cases, [launch(sched, m_static if m_static is not None else (hi or MAX_M_TILE))
                                  for _, hi, sched in cases])

    @T.prim_func(s_tir=True)
    def bsr_linear_cuda(x: T.Buffer((m, k), "float32"), data_h: T.handle, indices_h: T.handle,
                        indptr: T.Buffer((nbr + 1,), "int32"), bias: T.Buffer((n_pad,), "float32"),
                        y: T.Buffer((m, n), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        nnzb = T.int32()
        data = T.match_buffer(data_h, (nnzb, c, r), "float32")
        indices = T.match_buffer(indices_h, (nnzb,), "int32")
        run_all(x, data, indices, indptr, bias, y)

    return bsr_linear_cuda.without_attr("global_symbol")


def recurrent_kernel(
    cell: CellSpec, mats: list[BSRMatrix], seq: int | None, batch: int | None, scheds: list | tuple
) -> tvm.tirx.PrimFunc:
    """One direction of a GRU/LSTM/RNN layer; the argument list of :func:`codegen.cpu.recurrent_kernel`.

    ``xp[T, B, G*H]`` (input projection incl. its bias), per matrix its BSR arrays and
    recurrent bias, ``h0``, ``c0``, ``seq_lens``, ``peep[3H]``; outputs ``Y[T, B, H]``,
    ``h_T``, ``c_T``. See the module docstring for the kernel structure.
    """
    cases = scheds if scheds and isinstance(scheds[0], tuple) else ((1, None, tuple(scheds)),)
    return _recurrent_kernel(cell, tuple(LayoutKey.of(m) for m in mats), seq, batch, tuple(cases))


@functools.lru_cache(maxsize=64)
def _recurrent_kernel(cell: CellSpec, keys: tuple[LayoutKey, ...], seq_static: int | None,
                      batch_static: int | None, cases: tuple) -> tvm.tirx.PrimFunc:
    """``cases``: ``((lo, hi, schedules per matrix), ...)`` over the batch (one case when static).
    A symbolic batch runs one variant of the whole recurrence per bucket, picked on the host."""
    mats = [k.skeleton() for k in keys]
    assert len(mats) in (1, 2) and all(len(cs[2]) == len(mats) for cs in cases)
    seq = seq_static if seq_static is not None else tvm.tirx.Var("seq", "int32")
    batch = batch_static if batch_static is not None else tvm.tirx.Var("batch", "int32")
    if batch_static is not None:  # a static batch runs its own bucket's schedules only
        cases = (pick(batch_static, cases, cases),)
    hid, gates = cell.hidden, cell.num_gates
    gh = gates * hid
    two = len(mats) == 2
    fused = all(hid % m.block.r == 0 for m in mats)
    rev = 1 if cell.reverse else 0
    step = gate_update(cell)
    f_act, clip = cell.f_act, cell.clip_expr

    r0, c0_ = mats[0].block.r, mats[0].block.c
    r1 = mats[1].block.r if two else 1
    c1_ = mats[1].block.c if two else 1
    b0 = mats[0].num_block_rows
    b1 = mats[1].num_block_rows if two else 1
    g0 = mats[0].padded_shape[0]
    g1 = mats[1].padded_shape[0] if two else 1
    kp0 = mats[0].padded_shape[1]
    kp1 = mats[1].padded_shape[1] if two else 1

    def variant(scheds: tuple, bhint: int):
        """The whole recurrence for one batch bucket (its schedules chosen at ``bhint``)."""
        # one batch tile per warp pass; every mat-vec of the layer uses the same tile
        mt = _m_tile(bhint)
        mtiles = (batch + mt - 1) // mt
        s0 = scheds[0]
        s1 = scheds[1] if two else scheds[0]
        vec0, vec1 = math.gcd(r0, max(s0.vec, 1)), math.gcd(r1, max(s1.vec, 1))
        warps0, warps1 = max(1, min(s0.warps, 32)), max(1, min(s1.warps, 32))
        stage0 = s0.stage_x and mt * kp0 * 4 <= SHARED_BYTES
        stage1 = two and s1.stage_x and mt * kp1 * 4 <= SHARED_BYTES

        def hv_get(hv, row, col):  # hv = (parity, buffer) of the double-buffered h
            par, buf = hv
            return buf[par, T.min(row, batch - 1), col]

        def shared_get(xs, row, col):
            return xs[row, col]

        def rh_get(rh, row, col):
            return rh[T.min(row, batch - 1), col]

        mv0, lanes_r0 = _warp_block_row(r0, c0_, vec0, mt, shared_get if stage0 else hv_get)
        mv1, lanes_r1 = _warp_block_row(r1, c1_, vec1, mt, shared_get if stage1 else rh_get) if two else (None, 1)
        threads0, threads1 = warps0 * WARP, warps1 * WARP

        def _stage(kp, threads, load):
            total = mt * kp
            iters = -(-total // threads)

            @T.macro
            def stage(xs, src, m0, tid):
                for i in T.serial(iters):
                    idx = T.Bind(i * threads + tid)
                    if idx < total:
                        row = T.Bind(idx // kp)
                        kk = T.Bind(idx % kp)
                        xs[row, kk] = T.if_then_else(m0 + row < batch, load(src, T.min(m0 + row, batch - 1), kk),
                                                     T.float32(0))
                T.tvm_storage_sync("shared")

            return stage

        stage_h = _stage(kp0, threads0, hv_get)
        stage_rh = _stage(kp1, threads1, rh_get)

        def n_of(seq_lens, b):  # lengths clamped to T (a symbolic-length layer's default is 2^31 - 1)
            return T.min(seq_lens[b], seq)

        def tt_of(seq_lens, b, t):
            return n_of(seq_lens, b) * rev + t * (1 - 2 * rev) - rev

        @T.macro
        def store_g(g, rbias, acc, lanes_r, vec, r, ib, col0, m0, lane):
            # rows of block row ib -> g[b, col0 + row]
            if lane < lanes_r:
                for mm in T.unroll(mt):
                    for v in T.unroll(vec):
                        row = T.Bind(ib * r + lane * vec + v)
                        if m0 + mm < batch:
                            g[m0 + mm, col0 + row] = acc[mm, v] + rbias[row]

        @T.macro
        def update_unit(xp, g, h, c, peep, y, hv, seq_lens, b, j, t, par):
            if t < n_of(seq_lens, b):
                tt = T.Bind(tt_of(seq_lens, b, t))
                step(xp, g, h, c, peep, y, b, j, tt, g0)
            else:
                y[t, b, j] = T.float32(0)
            hv[1 - par, b, j] = h[b, j]

        @T.macro
        def reset_unit(xp, g, h, rh, seq_lens, b, j, t):
            if t < n_of(seq_lens, b):
                tt = T.Bind(tt_of(seq_lens, b, t))
                rh[b, j] = f_act(clip(xp[tt, b, hid + j] + g[b, hid + j])) * h[b, j]

        nub0 = hid // r0 if fused else 0  # unit blocks (warps) of the fused kernels
        nub1 = hid // r1 if fused and two else 0
        # gates whose rows mats[0] holds: all of them, or z and r for the split GRU
        gates0 = 2 if two else gates
        units0 = mt * r0
        units1 = mt * r1
        gx0 = -(-(nub0 if fused else b0) // warps0)
        gx1 = -(-(nub1 if fused else b1) // warps1) if two else 1
        n_el = batch * hid
        el_threads = 256
        gx_el = (n_el + el_threads - 1) // el_threads
        n_init = batch * max(kp0, kp1, hid)
        gx_init = (n_init + el_threads - 1) // el_threads
        sr0, sc0 = (mt, kp0) if stage0 else (1, 1)
        sr1, sc1 = (mt, kp1) if stage1 else (1, 1)

        # ---- phase 1: mat-vec of mats[0] on h (fused: + gate update, or + reset for split GRU)
        @T.macro
        def phase0(xp, data0, indices0, indptr0, rbias0, g, h, c, rh, hv, peep, y, seq_lens, t, par):
            for bx in T.thread_binding(gx0, thread="blockIdx.x"):
                for by in T.thread_binding(mtiles, thread="blockIdx.y"):
                    for ty in T.thread_binding(warps0, thread="threadIdx.y"):
                        for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                            xs = T.alloc_buffer((sr0, sc0), "float32", scope="shared")
                            acc = T.alloc_buffer((mt, vec0), "float32", scope="local")
                            w = T.alloc_buffer((vec0,), "float32", scope="local")
                            m0 = T.Bind(by * mt)
                            if stage0:
                                stage_h(xs, (par, hv), m0, ty * WARP + tx)
                            wid = T.Bind(bx * warps0 + ty)
                            if fused:
                                if wid < nub0:
                                    for k in T.serial(gates0):
                                        ib = T.Bind(k * nub0 + wid)
                                        if stage0:
                                            mv0(xs, data0, indices0, indptr0, ib, 0, tx, acc, w)
                                        else:
                                            mv0((par, hv), data0, indices0, indptr0, ib, m0, tx, acc, w)
                                        store_g(g, rbias0, acc, lanes_r0, vec0, r0, ib, 0, m0, tx)
                                T.tvm_storage_sync("shared")
                                if wid < nub0:
                                    for u in T.serial((units0 + WARP - 1) // WARP):
                                        idx = T.Bind(u * WARP + tx)
                                        if idx < units0 and m0 + idx // r0 < batch:
                                            if two:
                                                reset_unit(xp, g, h, rh, seq_lens, m0 + idx // r0,
                                                           wid * r0 + idx % r0, t)
                                            else:
                                                update_unit(xp, g, h, c, peep, y, hv, seq_lens, m0 + idx // r0,
                                                            wid * r0 + idx % r0, t, par)
                            else:
                                if wid < b0:
                                    if stage0:
                                        mv0(xs, data0, indices0, indptr0, wid, 0, tx, acc, w)
                                    else:
                                        mv0((par, hv), data0, indices0, indptr0, wid, m0, tx, acc, w)
                                    store_g(g, rbias0, acc, lanes_r0, vec0, r0, wid, 0, m0, tx)


        @T.macro
        def run(xp, data0, indices0, indptr0, rbias0, data1, indices1, indptr1, rbias1, h0, c0, seq_lens, peep,
                y, h_out, c_out, hv, rh, g):
            for bx in T.thread_binding(gx_init, thread="blockIdx.x"):
                for tx in T.thread_binding(el_threads, thread="threadIdx.x"):
                    idx = T.Bind(bx * el_threads + tx)
                    if idx < n_init:
                        b = T.Bind(idx % batch)
                        j = T.Bind(idx // batch)
                        if j < kp0:
                            hv[0, b, j] = T.if_then_else(j < hid, h0[b, T.min(j, hid - 1)], T.float32(0))
                            hv[1, b, j] = T.float32(0)
                        if j < kp1:
                            rh[b, j] = T.float32(0)
                        if j < hid:
                            h_out[b, j] = h0[b, j]
                            c_out[b, j] = c0[b, j]
            for t in T.serial(seq):
                par = T.Bind(t % 2)
                phase0(xp, data0, indices0, indptr0, rbias0, g, h_out, c_out, rh, hv, peep, y, seq_lens, t, par)
                if not fused:
                    if two:
                        for bx in T.thread_binding(gx_el, thread="blockIdx.x"):
                            for tx in T.thread_binding(el_threads, thread="threadIdx.x"):
                                idx = T.Bind(bx * el_threads + tx)
                                if idx < n_el:
                                    reset_unit(xp, g, h_out, rh, seq_lens, idx // hid, idx % hid, t)
                if two:
                    for bx in T.thread_binding(gx1, thread="blockIdx.x"):
                        for by in T.thread_binding(mtiles, thread="blockIdx.y"):
                            for ty in T.thread_binding(warps1, thread="threadIdx.y"):
                                for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                                    xs1 = T.alloc_buffer((sr1, sc1), "float32", scope="shared")
                                    acc1 = T.alloc_buffer((mt, vec1), "float32", scope="local")
                                    w1 = T.alloc_buffer((vec1,), "float32", scope="local")
                                    m1 = T.Bind(by * mt)
                                    if stage1:
                                        stage_rh(xs1, rh, m1, ty * WARP + tx)
                                    wid1 = T.Bind(bx * warps1 + ty)
                                    if wid1 < (nub1 if fused else b1):
                                        if stage1:
                                            mv1(xs1, data1, indices1, indptr1, wid1, 0, tx, acc1, w1)
                                        else:
                                            mv1(rh, data1, indices1, indptr1, wid1, m1, tx, acc1, w1)
                                        store_g(g, rbias1, acc1, lanes_r1, vec1, r1, wid1, g0, m1, tx)
                                    if fused:
                                        T.tvm_storage_sync("shared")
                                        if wid1 < nub1:
                                            for u in T.serial((units1 + WARP - 1) // WARP):
                                                idx1 = T.Bind(u * WARP + tx)
                                                if idx1 < units1 and m1 + idx1 // r1 < batch:
                                                    update_unit(xp, g, h_out, c_out, peep, y, hv, seq_lens,
                                                                m1 + idx1 // r1, wid1 * r1 + idx1 % r1, t, par)
                if not fused:
                    for bx in T.thread_binding(gx_el, thread="blockIdx.x"):
                        for tx in T.thread_binding(el_threads, thread="threadIdx.x"):
                            idx = T.Bind(bx * el_threads + tx)
                            if idx < n_el:
                                update_unit(xp, g, h_out, c_out, peep, y, hv, seq_lens, idx // hid, idx % hid,
                                            t, par)


        return run

    # one variant of the whole recurrence per bucket, picked on the host by an if-chain on the batch
    run_all = dispatch(batch, cases, [variant(scheds, batch_static if batch_static is not None else (hi or MAX_M_TILE))
                                      for _, hi, scheds in cases])

    # ---- the prim func
    @T.prim_func(s_tir=True)
    def recurrence_cuda(
        xp: T.Buffer((seq, batch, gh), "float32"),
        data0_h: T.handle,
        indices0_h: T.handle,
        indptr0: T.Buffer((b0 + 1,), "int32"),
        rbias0: T.Buffer((g0,), "float32"),
        data1_h: T.handle,
        indices1_h: T.handle,
        indptr1: T.Buffer((b1 + 1,), "int32"),
        rbias1: T.Buffer((g1,), "float32"),
        h0: T.Buffer((batch, hid), "float32"),
        c0: T.Buffer((batch, hid), "float32"),
        seq_lens: T.Buffer((batch,), "int32"),
        peep: T.Buffer((3 * hid,), "float32"),
        y: T.Buffer((seq, batch, hid), "float32"),
        h_out: T.Buffer((batch, hid), "float32"),
        c_out: T.Buffer((batch, hid), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n0 = T.int32()
        n1 = T.int32()
        data0 = T.match_buffer(data0_h, (n0, c0_, r0), "float32")
        indices0 = T.match_buffer(indices0_h, (n0,), "int32")
        data1 = T.match_buffer(data1_h, (n1, c1_, r1), "float32")
        indices1 = T.match_buffer(indices1_h, (n1,), "int32")
        hv = T.alloc_buffer((2, batch, kp0), "float32")  # h double buffer, zero padded to kp0
        rh = T.alloc_buffer((batch, kp1), "float32")  # r * h (split GRU), zero padded to kp1
        g = T.alloc_buffer((batch, g0 + g1), "float32")  # gate pre-activations of one step
        run_all(xp, data0, indices0, indptr0, rbias0, data1, indices1, indptr1, rbias1, h0, c0, seq_lens,
                peep, y, h_out, c_out, hv, rh, g)

    return recurrence_cuda.without_attr("global_symbol")


class CudaBlockRowGenerator(Generator):
    """The ``linear`` and ``recurrent`` kinds on NVIDIA GPUs: the warp-per-block-row kernels
    above and the roofline of :mod:`codegen.cuda_cost`."""

    def __init__(self, gpu: GpuModel, recurrent: bool):
        self.gpu, self.recurrent = gpu, recurrent
    #: symbolic m (rows of a linear site, the batch of a recurrent one; and its sequence
    #: length): one launch configuration per m bucket, picked on the host
    symbolic_m = True

    def kernel(self, site: dict, mats: list[BSRMatrix], buckets: list) -> tvm.tirx.PrimFunc:
        if self.recurrent:
            cases = tuple((b.lo, b.hi, tuple(b.schedules)) for b in buckets)
            return recurrent_kernel(CellSpec.from_json(site["cell"]), mats, static_dim(site["seq"]),
                                    static_dim(site["batch"]), cases)
        cases = tuple((b.lo, b.hi, b.schedules[0]) for b in buckets)
        return linear_kernel(mats[0], static_dim(site["m"]), cases)

    def default_schedule(self, site: dict, stats: BlockStats, m: int) -> CudaSchedule:
        return schedule_for(stats.block, stats.padded_shape[0] // stats.block.r, stats.padded_shape[1], m)

    def schedule_space(self, site: dict, mat: BSRMatrix, m: int) -> list[CudaSchedule]:
        base = default_schedule(mat, m)
        out = [base] + [CudaSchedule(w, base.m_tile, base.vec, base.stage_x) for w in (1, 2, 4, 8) if w != base.warps]
        if base.stage_x:
            out.append(CudaSchedule(base.warps, base.m_tile, base.vec, False))
        return out

    def schedule_from_json(self, d: dict) -> CudaSchedule:
        return CudaSchedule.from_json(d)

    def estimate_time(self, site: dict, stats: BlockStats, m: int) -> float:
        """Per call; a recurrent site per time step (weights L2-resident across steps)."""
        block = stats.block
        n, k = site["shape"]
        return estimate_time(self.gpu, nnz_blocks=stats.nnz_blocks, r=block.r, c=block.c,
                             num_block_rows=stats.padded_shape[0] // block.r, m=m, m_tile=_m_tile(m), n=n, k=k,
                             recurrent_steps=1 if self.recurrent else 0)
