"""Opt-in persistent recurrent CUDA kernel (Zhu et al. 2018, "Sparse persistent RNNs").

One kernel runs all time steps of a recurrent layer direction. A grid of thread
blocks, which must all be resident on the GPU at once, holds the sparse recurrent
weights in shared memory for the whole sequence: warp ``wid`` owns hidden units
``[wid r, (wid + 1) r)`` and the block rows of every gate for them (the warp layout,
reduction and gate update of the per-step kernels in :mod:`codegen.cuda`). Steps are
ordered without a grid barrier: each hidden value is published as one 64-bit word
``(value bits, step stamp)`` (the paper's "Lamport timestamps": the flag travels with
the data, so no fence orders them), double-buffered by step parity; a block stages
``h_t`` by spinning (``__nanosleep``) on each word until its stamp is ``t``. A block
can overwrite slot ``t % 2`` at step ``t + 1`` only after every block published step
``t``, i.e. finished reading it, so two slots suffice.

Co-residency is not guaranteed by an ordinary launch (TVM 0.27 emits no cooperative
launch): if the grid does not fit on the GPU at once, blocks wait for blocks that
never start and the kernel hangs. :func:`recurrent_kernel` therefore keeps the grid
small (``max_blocks``, default 100: fewer than the SMs of an A100 or H100) and the
per-step kernels stay the default until a GPU has measured both (``bench/gpu.py``).
The CUDA emulator runs it in co-resident mode and reports a deadlock otherwise.

Supported: one weight matrix per step (GRU with ``linear_before_reset``, LSTM, RNN)
whose block height divides the hidden size, and weights + staged ``h`` within
``max_shared`` bytes of (dynamic) shared memory per block (:data:`MAX_SHARED_BY_ARCH`):
a GRU of hidden size 2304 at 90% sparsity in 8x8 blocks, batch 4, needs about 125 KiB in
each of 72 blocks (sm_80 / sm_90 only); at 70% sparsity it does not fit. The argument list is that of
:func:`codegen.cuda.recurrent_kernel`, so it can replace it site by site.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tvm
from tvm.script import tirx as T

from bscompile.codegen.cuda import WARP, CudaBlockRowGenerator, CudaSchedule, _m_tile, _warp_block_row
from bscompile.codegen.layout import BlockStats, BSRMatrix
from bscompile.codegen.recurrent_cells import CellSpec, gate_update
from bscompile.errors import UnsupportedModelError

#: No stamp yet (slot 1 before step 0 publishes).
_NO_STAMP = 0xFFFFFFFF


class PersistentUnsupported(ValueError):
    """The layer does not fit the persistent schedule (use the per-step kernels)."""


#: Dynamic shared memory a block may opt into on every supported GPU (sm_86 / sm_89: 99 KiB;
#: sm_80: 163 KiB; sm_90: 227 KiB).
MAX_SHARED_BYTES = 96 * 1024
#: Co-resident blocks asked for by default: fewer than the SMs of an A100 (108) or H100 (132).
MAX_BLOCKS = 100


#: Dynamic shared memory one block may opt into, by architecture (CUDA programming guide).
MAX_SHARED_BY_ARCH = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_87": 163 * 1024, "sm_89": 99 * 1024,
                      "sm_90": 227 * 1024}


def max_shared_for(arch: str) -> int:
    return MAX_SHARED_BY_ARCH.get(arch, MAX_SHARED_BYTES)


def plan(cell: CellSpec, mat: BSRMatrix, batch: int, warps: int, max_blocks: int = MAX_BLOCKS,
         max_shared: int = MAX_SHARED_BYTES) -> dict:
    """Grid and shared-memory sizes for ``mat``'s sparsity pattern, or :class:`PersistentUnsupported`.

    Fewer warps per block spread the weights over more blocks; the most warps (up to
    ``warps``) whose grid stays within ``max_blocks`` and whose blocks fit ``max_shared`` win.
    """
    hid, gates = cell.hidden, cell.num_gates
    r, c = mat.block.r, mat.block.c
    if cell.kind == "gru" and not cell.linear_before_reset:
        raise PersistentUnsupported("GRU without linear_before_reset needs two mat-vecs per step")
    if hid % r:
        raise PersistentUnsupported(f"block height {r} does not divide the hidden size {hid}")
    nub = hid // r
    ptr = mat.indptr.astype(np.int64)
    mt = _m_tile(batch)
    kp = mat.padded_shape[1]
    best = None
    for w in range(max(1, min(warps, nub, 1024 // WARP)), 0, -1):
        gx = -(-nub // w)
        if gx > max_blocks:
            break
        cap = max(1, max(sum(int(ptr[k * nub + bx * w + min(w, nub - bx * w)] - ptr[k * nub + bx * w])
                             for k in range(gates)) for bx in range(gx)))
        smem = 4 * (cap * c * r + cap + gates * w + 1 + mt * kp)
        best = {"warps": w, "grid": gx, "cap": cap, "m_tile": mt, "shared_bytes": smem}
        if smem <= max_shared:
            return best
    if best is None:
        raise PersistentUnsupported(f"{nub} unit blocks do not fit {max_blocks} co-resident blocks of "
                                    f"{min(warps, 1024 // WARP)} warps")
    raise PersistentUnsupported(f"{best['shared_bytes']} bytes of weights and state per block (with {best['grid']} "
                                f"blocks) exceed the {max_shared} bytes of shared memory a block may use")


def recurrent_kernel(cell: CellSpec, mats: list[BSRMatrix], seq: int, batch: int, scheds: list[CudaSchedule],
                     max_blocks: int = MAX_BLOCKS, max_shared: int = MAX_SHARED_BYTES) -> tvm.tirx.PrimFunc:
    """The persistent kernel for one direction; the argument list of :func:`codegen.cuda.recurrent_kernel`.

    Specialised on ``mats[0]``'s sparsity pattern (the shared-memory size is static).
    """
    if len(mats) != 1:
        raise PersistentUnsupported("one recurrent weight matrix per step only")
    mat = mats[0]
    p = plan(cell, mat, batch, scheds[0].warps, max_blocks, max_shared)
    hid, gates = cell.hidden, cell.num_gates
    gh = gates * hid
    r, c = mat.block.r, mat.block.c
    nub, nbr = hid // r, mat.num_block_rows
    g0, kp = mat.padded_shape
    W, gx, cap, mt = p["warps"], p["grid"], p["cap"], p["m_tile"]
    mtiles = -(-batch // mt)
    threads = W * WARP
    vec = math.gcd(r, max(scheds[0].vec, 1))
    rev = 1 if cell.reverse else 0
    step = gate_update(cell)
    units = mt * r
    el_threads = 256
    n_init = batch * hid
    gx_init = -(-n_init // el_threads)

    def xget(xs, row, col):
        return xs[row, col]

    block_row, lanes_r = _warp_block_row(r, c, vec, mt, xget)
    n_lip = gates * W + 1
    w_iters = -(-(cap * c * r) // threads)
    i_iters = -(-cap // threads)
    s_iters = -(-(mt * kp) // threads)

    def pack(h, stamp):
        return T.bitwise_or(T.Cast("uint64", T.reinterpret("uint32", h)),
                            T.shift_left(T.Cast("uint64", T.Cast("uint32", stamp)), T.uint64(32)))

    def stamp_of(word):
        return T.Cast("uint32", T.shift_right(word, T.uint64(32)))

    def value_of(word):
        return T.reinterpret("float32", T.Cast("uint32", T.bitwise_and(word, T.uint64(0xFFFFFFFF))))

    @T.macro
    def range_of(indptr, bx, k, lo, off):
        # block rows k*nub + [bx*W, bx*W + w_end) of gate k are contiguous in the BSR arrays
        w_end = T.Bind(T.min(W, nub - bx * W))
        lo[k] = indptr[k * nub + bx * W]
        off[k + 1] = off[k] + indptr[k * nub + bx * W + w_end] - lo[k]

    @T.prim_func(s_tir=True)
    def recurrence_persistent_cuda(
        xp: T.Buffer((seq, batch, gh), "float32"),
        data0_h: T.handle,
        indices0_h: T.handle,
        indptr0: T.Buffer((nbr + 1,), "int32"),
        rbias0: T.Buffer((g0,), "float32"),
        data1_h: T.handle,
        indices1_h: T.handle,
        indptr1: T.Buffer((2,), "int32"),
        rbias1: T.Buffer((1,), "float32"),
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
        data0 = T.match_buffer(data0_h, (n0, c, r), "float32")
        indices0 = T.match_buffer(indices0_h, (n0,), "int32")
        data1 = T.match_buffer(data1_h, (n1, 1, 1), "float32")
        indices1 = T.match_buffer(indices1_h, (n1,), "int32")
        hts = T.alloc_buffer((2, batch, hid), "uint64")  # (h bits, step stamp), by step parity
        g = T.alloc_buffer((batch, g0), "float32")  # gate pre-activations (block-local rows)
        # ---- init kernel: state, slot 0 = (h0, stamp 0), slot 1 = no stamp
        for bx in T.thread_binding(gx_init, thread="blockIdx.x"):
            for tx in T.thread_binding(el_threads, thread="threadIdx.x"):
                idx = T.Bind(bx * el_threads + tx)
                if idx < n_init:
                    b = T.Bind(idx // hid)
                    j = T.Bind(idx % hid)
                    h_out[b, j] = h0[b, j]
                    c_out[b, j] = c0[b, j]
                    hts[0, b, j] = pack(h0[b, j], 0)
                    hts[1, b, j] = T.shift_left(T.Cast("uint64", T.uint32(_NO_STAMP)), T.uint64(32))
        # ---- the persistent kernel: all steps
        for bx in T.thread_binding(gx, thread="blockIdx.x"):
            for ty in T.thread_binding(W, thread="threadIdx.y"):
                for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                    ws = T.alloc_buffer((cap, c, r), "float32", scope="shared.dyn")
                    wi = T.alloc_buffer((cap,), "int32", scope="shared.dyn")
                    lip = T.alloc_buffer((n_lip,), "int32", scope="shared.dyn")
                    xs = T.alloc_buffer((mt, kp), "float32", scope="shared.dyn")
                    lo = T.alloc_buffer((gates,), "int32", scope="local")
                    off = T.alloc_buffer((gates + 1,), "int32", scope="local")
                    acc = T.alloc_buffer((mt, vec), "float32", scope="local")
                    w = T.alloc_buffer((vec,), "float32", scope="local")
                    word = T.alloc_buffer((1,), "uint64", scope="local")
                    tid = T.Bind(ty * WARP + tx)
                    w_end = T.Bind(T.min(W, nub - bx * W))
                    off[0] = 0
                    for k in T.unroll(gates):
                        range_of(indptr0, bx, k, lo, off)
                    # weights of this block's unit blocks -> shared, once for all steps
                    for k in T.unroll(gates):
                        if tid < W:
                            lip[k * W + tid] = off[k] + indptr0[k * nub + bx * W + T.min(tid, w_end)] - lo[k]
                    if tid == 0:
                        lip[gates * W] = off[gates]
                    for i in T.serial(w_iters):
                        e = T.Bind(i * threads + tid)
                        if e < off[gates] * (c * r):
                            q = T.Bind(e // (c * r))
                            for k in T.unroll(gates):
                                if off[k] <= q and q < off[k + 1]:
                                    ws[q, (e // r) % c, e % r] = data0[lo[k] + q - off[k], (e // r) % c, e % r]
                    for i in T.serial(i_iters):
                        q = T.Bind(i * threads + tid)
                        if q < off[gates]:
                            for k in T.unroll(gates):
                                if off[k] <= q and q < off[k + 1]:
                                    wi[q] = indices0[lo[k] + q - off[k]]
                    T.tvm_storage_sync("shared")
                    wid = T.Bind(bx * W + ty)
                    for t in T.serial(seq):
                        par = T.Bind(t % 2)
                        for mi in T.serial(mtiles):
                            m0 = T.Bind(mi * mt)
                            # stage h_t, waiting for each word's stamp t
                            for i in T.serial(s_iters):
                                idx = T.Bind(i * threads + tid)
                                if idx < mt * kp:
                                    row = T.Bind(idx // kp)
                                    kk = T.Bind(idx % kp)
                                    if m0 + row < batch and kk < hid:
                                        word[0] = T.call_extern("uint64", "__ldcv",
                                                                T.address_of(hts[par, m0 + row, kk]))
                                        while stamp_of(word[0]) != T.Cast("uint32", t):
                                            T.evaluate(T.call_extern("void", "__nanosleep", T.uint32(64)))
                                            word[0] = T.call_extern("uint64", "__ldcv",
                                                                    T.address_of(hts[par, m0 + row, kk]))
                                        xs[row, kk] = value_of(word[0])
                                    else:
                                        xs[row, kk] = T.float32(0)
                            T.tvm_storage_sync("shared")
                            if ty < w_end:
                                for k in T.serial(gates):
                                    block_row(xs, ws, wi, lip, k * W + ty, 0, tx, acc, w)
                                    if tx < lanes_r:
                                        for mm in T.unroll(mt):
                                            for v in T.unroll(vec):
                                                grow = T.Bind((k * nub + wid) * r + tx * vec + v)
                                                if m0 + mm < batch:
                                                    g[m0 + mm, grow] = acc[mm, v] + rbias0[grow]
                            T.tvm_storage_sync("shared")
                            if ty < w_end:
                                for u in T.serial((units + WARP - 1) // WARP):
                                    ui = T.Bind(u * WARP + tx)
                                    if ui < units and m0 + ui // r < batch:
                                        b = T.Bind(m0 + ui // r)
                                        j = T.Bind(wid * r + ui % r)
                                        if t < seq_lens[b]:
                                            # lens clamped to seq: lens > seq read x[lens - 1]
                                            tt = T.Bind(T.min(seq_lens[b], seq) * rev + t * (1 - 2 * rev) - rev)
                                            step(xp, g, h_out, c_out, peep, y, b, j, tt, g0)
                                        else:
                                            y[t, b, j] = T.float32(0)
                                        hts[1 - par, b, j] = pack(h_out[b, j], t + 1)

    return recurrence_persistent_cuda.without_attr("global_symbol")


class PersistentGenerator(CudaBlockRowGenerator):
    """Recurrent sites on the persistent kernel (``--persistent-rnn``): opted into, so a
    layer that does not fit is a one-line error rather than a silent fallback."""

    def __init__(self, gpu):
        super().__init__(gpu, recurrent=True)

    def default_schedule(self, site: dict, stats: BlockStats, m: int) -> CudaSchedule:
        return dataclasses.replace(super().default_schedule(site, stats, m), persistent=True)

    def kernel(self, site: dict, mats: list[BSRMatrix], scheds: list[CudaSchedule]) -> tvm.tirx.PrimFunc:
        if not scheds[0].persistent:
            return super().kernel(site, mats, scheds)
        try:
            return recurrent_kernel(CellSpec.from_json(site["cell"]), mats, site["seq"], site["batch"], scheds)
        except PersistentUnsupported as err:
            raise UnsupportedModelError(f"recurrent weight '{site['name']}' cannot run persistent ({err}); "
                                        "compile without --persistent-rnn") from None
