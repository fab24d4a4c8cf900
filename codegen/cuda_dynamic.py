"""CUDA kernels for dynamic weight sites (input-dependent block selection).

Same calling convention as :func:`codegen.cpu_dynamic.dynamic_linear_kernel` (the
site kind packs its operands once for every family: tiles ``[nbo, nbi, bs, bs]``,
the gate ``[ng, in, GATE_ROWS]``, its bias padded with ``-inf``), three launches:

1. **gate**: one thread per score, ``GATE_ROWS`` threads per block reading a packed gate
   row group (coalesced), ``g[b, n] = x[b] . Wg[n] + bg[n]``;
2. **selection**, one thread block per row, one thread per score: score ``n`` is kept
   iff fewer than ``k`` scores are strictly larger (that is ``g[n] >= kth`` with the
   k-th largest ``kth``, ties keeping more than k, as onnxruntime's TopK +
   GreaterOrEqual; NaN never kept; ``-inf`` -- a statically pruned tile -- never kept
   while ``k <= n_alive``), O(N) per thread; thread 0 then sums the kept scores and
   every thread writes ``r = g * mask / (sum / n_alive)``;
3. **tile product**, one thread block per (output block, row), one thread per output:
   the thread walks the row's selected tiles of its output block, each a coalesced run
   of ``bs`` weights per input, and adds the bias.

A gated recurrence (``dynamic_recurrent``) runs the same three launches per step on the
carried ``h``, then a cell-update launch, in a host loop over its symbolic length
(:func:`dynamic_recurrent_kernel`).

The selection is quadratic in the tiles per row (a few hundred: the gate costs
``in/bs^2`` of the dense product only for large blocks), and all of it runs per call;
it trades the CPU kernel's serial quickselect (about 3N comparisons a row) for no inter-thread scans. Tuning and a GPU
machine model for it are left to a GPU session (``bench/gpu.py``).
"""

from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from bscompile.codegen.cuda_cost import GpuModel
from bscompile.codegen.dynamic_layout import GATE_ROWS, DynamicShape
from bscompile.codegen.family import Generator
from bscompile.codegen.recurrent_cells import CellSpec, gate_update

#: Most tiles one selection block handles (threads per block).
MAX_TILES = 1024


def launches(shape: DynamicShape, m: int, n_alive: int) -> tuple:
    """The three launches for ``m`` rows as macros: ``gate(x, gate_w, gate_b, g)``,
    ``select(g, r)`` and ``product(x, tiles, r, bias, y)`` (``g``, ``r``: ``[m, ng * GATE_ROWS]``
    scratch); the dynamic site runs them once, the recurrence once per step."""
    fin, bs, nbo, nbi, k = shape.in_features, shape.block, shape.nbo, shape.nbi, shape.k
    n_tiles = shape.num_tiles
    if n_tiles > MAX_TILES or bs > 1024:
        raise ValueError(f"the CUDA dynamic kernel handles at most {MAX_TILES} tiles of at most 1024 rows")
    ng = -(-n_tiles // GATE_ROWS)
    sel_threads = -(-n_tiles // 32) * 32
    inv_alive = 1.0 / n_alive

    @T.macro
    def gate(x, gate_w, gate_b, g):
        for grp in T.thread_binding(ng, thread="blockIdx.x"):
            for b in T.thread_binding(m, thread="blockIdx.y"):
                for v in T.thread_binding(GATE_ROWS, thread="threadIdx.x"):
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = gate_b[grp * GATE_ROWS + v]
                    for i in T.serial(fin):
                        acc[0] = acc[0] + x[b, i] * gate_w[grp, i, v]
                    g[b, grp * GATE_ROWS + v] = acc[0]

    @T.macro
    def select(g, r):
        for b in T.thread_binding(m, thread="blockIdx.x"):
            for t in T.thread_binding(sel_threads, thread="threadIdx.x"):
                gs = T.alloc_buffer((sel_threads,), "float32", scope="shared")
                total = T.alloc_buffer((1,), "float32", scope="shared")
                cnt = T.alloc_buffer((1,), "int32", scope="local")
                gs[t] = T.if_then_else(t < n_tiles, g[b, T.min(t, n_tiles - 1)], T.float32("-inf"))
                T.tvm_storage_sync("shared")
                cnt[0] = 0
                for j in T.serial(n_tiles):  # shared reads in values only (TVM's storage sync analysis)
                    cnt[0] = cnt[0] + T.Cast("int32", gs[j] > gs[t])
                if t < n_tiles:
                    r[b, t] = T.Select(cnt[0] < k and not T.isnan(gs[t]), gs[t], T.float32(0))
                T.tvm_storage_sync("shared")
                if t == 0:
                    ssum = T.alloc_buffer((1,), "float32", scope="local")
                    ssum[0] = T.float32(0)
                    for j in T.serial(n_tiles):
                        ssum[0] = ssum[0] + r[b, j]
                    total[0] = ssum[0]
                T.tvm_storage_sync("shared")
                if t < n_tiles:
                    r[b, t] = r[b, t] / (total[0] * T.float32(inv_alive))

    @T.macro
    def product(x, tiles, r, bias, y):
        for ob in T.thread_binding(nbo, thread="blockIdx.x"):
            for b in T.thread_binding(m, thread="blockIdx.y"):
                for q in T.thread_binding(bs, thread="threadIdx.x"):
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    part = T.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = T.float32(0)
                    for ib in T.serial(nbi):
                        scale = T.Bind(r[b, ib * nbo + ob])
                        if scale != T.float32(0):
                            part[0] = T.float32(0)
                            for p in T.serial(bs):
                                part[0] = part[0] + x[b, ib * bs + p] * tiles[ob, ib, p, q]
                            acc[0] = acc[0] + part[0] * scale
                    y[b, ob * bs + q] = acc[0] + bias[ob * bs + q]

    return gate, select, product


@functools.lru_cache(maxsize=32)
def dynamic_linear_kernel(in_features: int, out_features: int, block: int, k: int, m: int | None,
                          n_alive: int) -> tvm.tirx.PrimFunc:
    """``m`` rows, or None for a symbolic m (the grid's row dimension is m either way)."""
    shape = DynamicShape(in_features, out_features, block, k)
    fin, fout, bs, nbo, nbi = shape.in_features, shape.out_features, shape.block, shape.nbo, shape.nbi
    ng = -(-shape.num_tiles // GATE_ROWS)
    npad = ng * GATE_ROWS
    rows = m if m is not None else tvm.tirx.Var("m", "int32")
    gate, select, product = launches(shape, rows, n_alive)

    @T.prim_func(s_tir=True)
    def dynamic_linear_cuda(x_h: T.handle, tiles: T.Buffer((nbo, nbi, bs, bs), "float32"),
                            gate_w: T.Buffer((ng, fin, GATE_ROWS), "float32"), gate_b: T.Buffer((npad,), "float32"),
                            bias: T.Buffer((fout,), "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (rows, fin), "float32")
        y = T.match_buffer(y_h, (rows, fout), "float32")
        g = T.alloc_buffer((rows, npad), "float32")
        r = T.alloc_buffer((rows, npad), "float32")
        gate(x, gate_w, gate_b, g)
        select(g, r)
        product(x, tiles, r, bias, y)

    return dynamic_linear_cuda.without_attr("global_symbol")


class CudaDynamicGenerator(Generator):
    """The ``dynamic_linear`` kind on NVIDIA GPUs: one schedule, costed as its gate plus
    the selected tiles streamed from HBM (``k`` of ``N`` per row, every row). A symbolic m
    is the grid's row dimension: one kernel for every m (no buckets to pick)."""

    symbolic_m = True

    def __init__(self, gpu: GpuModel):
        self.gpu = gpu

    def kernel(self, site: dict, mats: list, buckets: list) -> tvm.tirx.PrimFunc:
        out_f, in_f = site["shape"]
        m = site["m"] if isinstance(site["m"], int) else None
        return dynamic_linear_kernel(in_f, out_f, site["block"], site["k"], m, site["n_alive"])

    def default_schedule(self, site: dict, stats, m: int) -> "_Fixed":
        return _Fixed()

    def schedule_from_json(self, d: dict) -> "_Fixed":
        return _Fixed()

    def estimate_time(self, site: dict, stats, m: int) -> float:
        out_f, in_f = site["shape"]
        shape = DynamicShape(in_f, out_f, site["block"], site["k"])
        gate_bytes = shape.num_tiles * in_f * 4
        tile_bytes = m * shape.k * shape.block ** 2 * 4
        return 3 * self.gpu.launch_s + (gate_bytes + tile_bytes) / self.gpu.hbm_bandwidth


class _Fixed:
    """The CUDA dynamic kernel has one schedule."""

    def to_json(self) -> dict:
        return {}


#: Threads per block of the recurrence's elementwise launches (state copy, cell update).
_EL_THREADS = 128


@functools.lru_cache(maxsize=32)
def dynamic_recurrent_kernel(cell: CellSpec, block: int, k: int, n_alive: int, batch: int,
                             seq_static: int | None) -> tvm.tirx.PrimFunc:
    """The CUDA form of :func:`codegen.cpu_dynamic_recurrent.dynamic_recurrent_kernel` (same
    arguments): a host loop over the (symbolic) steps around four launches per step -- the
    gate of ``h``, the selection, the selected tiles of ``W_hh`` into the step's
    pre-activations, and the cell update (one thread per unit), which writes ``h`` and ``c``
    (the output buffers hold the state) and ``y[t]``. Launches on one stream run in order:
    no launch reads what a running one writes."""
    hid = cell.hidden
    shape = DynamicShape(hid, cell.num_gates * hid, block, k)
    gh, bs, nbo, nbi = shape.out_features, shape.block, shape.nbo, shape.nbi
    ng = -(-shape.num_tiles // GATE_ROWS)
    npad = ng * GATE_ROWS
    gate, select, product = launches(shape, batch, n_alive)
    step = gate_update(cell)
    seq = seq_static if seq_static is not None else tvm.tirx.Var("seq", "int32")
    n_el = batch * hid
    gx = -(-n_el // _EL_THREADS)

    @T.prim_func(s_tir=True)
    def dynamic_recurrence_cuda(xp_h: T.handle, h0: T.Buffer((batch, hid), "float32"),
                                c0: T.Buffer((batch, hid), "float32"), tiles: T.Buffer((nbo, nbi, bs, bs), "float32"),
                                gate_w: T.Buffer((ng, hid, GATE_ROWS), "float32"), gate_b: T.Buffer((npad,), "float32"),
                                bias: T.Buffer((gh,), "float32"), y_h: T.handle, h: T.Buffer((batch, hid), "float32"),
                                c: T.Buffer((batch, hid), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        xp = T.match_buffer(xp_h, (seq, batch, gh), "float32")
        y = T.match_buffer(y_h, (seq, batch, hid), "float32")
        g = T.alloc_buffer((batch, npad), "float32")
        r = T.alloc_buffer((batch, npad), "float32")
        pre = T.alloc_buffer((batch, gh), "float32")
        peep = T.alloc_buffer((3 * hid,), "float32")
        for bx in T.thread_binding(gx, thread="blockIdx.x"):
            for tx in T.thread_binding(_EL_THREADS, thread="threadIdx.x"):
                idx = T.Bind(bx * _EL_THREADS + tx)
                if idx < n_el:
                    h[idx // hid, idx % hid] = h0[idx // hid, idx % hid]
                    c[idx // hid, idx % hid] = c0[idx // hid, idx % hid]
                if idx < 3 * hid:
                    peep[idx] = T.float32(0)
        for t in T.serial(seq):
            gate(h, gate_w, gate_b, g)
            select(g, r)
            product(h, tiles, r, bias, pre)
            for bx in T.thread_binding(gx, thread="blockIdx.x"):
                for tx in T.thread_binding(_EL_THREADS, thread="threadIdx.x"):
                    idx = T.Bind(bx * _EL_THREADS + tx)
                    if idx < n_el:
                        step(xp, pre, h, c, peep, y, idx // hid, idx % hid, t, 0)

    return dynamic_recurrence_cuda.without_attr("global_symbol")


class CudaDynamicRecurrentGenerator(CudaDynamicGenerator):
    """The ``dynamic_recurrent`` kind on NVIDIA GPUs: :func:`dynamic_recurrent_kernel`, its
    symbolic sequence length a host loop; costed per step, as the dynamic site at the batch
    plus the cell update's launch."""

    symbolic_m = True  # (the sequence length; the batch, the site's m, is static)

    def kernel(self, site: dict, mats: list, buckets: list) -> tvm.tirx.PrimFunc:
        seq = site["seq"] if isinstance(site["seq"], int) else None
        return dynamic_recurrent_kernel(CellSpec.from_json(site["cell"]), site["block"], site["k"], site["n_alive"],
                                        site["m"], seq)

    def estimate_time(self, site: dict, stats, m: int) -> float:
        return super().estimate_time(site, stats, m) + self.gpu.launch_s
