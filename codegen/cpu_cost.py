"""The CPU family's machine model: analytical cost of the block-row kernels of :mod:`codegen.cpu`.

Per variant (see :mod:`codegen.cpu`): "rows" does one vector FMA per (block column,
batch row, ceil(r / lanes) vectors) and keeps a block row in cache across M tiles;
"block" does ceil(r*c / lanes) FMAs per (block, batch row), each against a load and shuffle
of ``x`` (plus filling a replicated copy of ``x`` where the block does not divide K;
"unrolled" the same without the per-block overhead); "batch" does r FMAs per (block
column, batch tile) but streams the weights once per batch tile. A layout's time is the larger
of its memory time and its compute time, plus a per-block overhead (index load, loop control);
activations that fit the cache are read from it (pricing them at memory bandwidth chose 16x4 "rows" kernels over the measured-faster
4x4 "batch" ones for the char GRU's m = 50 products: 7% of the model); the compute time counts loads
(broadcasts of ``x``, weight vectors) against the same issue rate as FMAs. The machine
constants are per machine (:data:`MACHINES`: this x86 host class and the aarch64 boards);
``bscompile tune`` replaces the choice by measurement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MachineModel:
    bandwidth: float = 12e9  # bytes/s streamed from memory by all threads
    vector_fma_rate: float = 8e9  # vector FMAs/s (2 cores x 2 FMA/cycle x ~2 GHz)
    lanes: int = 8  # fp32 lanes per vector register
    block_overhead_s: float = 1.2e-9  # per stored block and M tile
    #: The "batch" variant's FMAs relative to the others': each weight broadcast feeds only
    #: ``m_vec / lanes`` FMAs and the tile keeps fewer independent accumulators.
    batch_fma_cost: float = 1.0
    call_overhead_s: float = 2e-6  # kernel launch / thread-pool wake-up
    #: A recurrent kernel reads its weights once per step: weights up to ``cache_bytes``
    #: stay in cache between steps and stream at ``cache_bandwidth`` (0: not measured for
    #: this machine, every step priced at the memory bandwidth).
    cache_bytes: int = 0
    cache_bandwidth: float = 0.0
    #: cores the kernels run on (0: not known; set from the target, ``TargetSpec.cores``): with 2, a
    #: parallel linear kernel's two threads claim its block rows (:mod:`codegen.claim`) instead of
    #: splitting them statically among however many threads the pool has
    cores: int = 0


#: This x86 host class: half its 32 MiB L3 (shared with the other core and the activations)
#: and what bscompile's dense recurrent kernels read per step on 2 threads (measured here: GRU
#: 64->512, 3 MiB, 27 us/step; LSTM 1024->1024, 16 MiB, 138 us/step: 110-116 GB/s).
CACHE_X86 = 16 << 20
CACHE_BW_X86 = 100e9

#: This x86 host class, 2 threads, fitted to measured kernels (``python bench/cost_model.py``,
#: 2026-12-07: 1760x1760 and 4096x1024 weights, unstructured and 4x4/16x16-block pruned at
#: 25-95%, m = 1-64, dense and 13 block shapes each, warm): the memory term at what the
#: kernels stream (between the cold DRAM floor, ~30 GB/s, and L3, ~110 GB/s) and 128
#: GFLOP/s of FMAs in either vector width. The former 12 GB/s / 8e9 AVX-512 FMAs priced every
#: kernel as memory-bound, so per-block costs never counted: at m <= 4 it chose 2x1-4x1
#: blocks for unstructured 80-90% weights that ran 1.4-3.6x slower than the dense kernel
#: (``bench/results/cost_model.md``, 14:43 run: 11 of 80 picks more than 1.1x slower than dense,
#: geomean regret 1.21x; this model none, 1.11x).
BANDWIDTH_X86 = 50e9
FLOPS_X86 = 128e9
#: The same runs, every candidate's measured time against its estimate (geomean): "batch"
#: kernels 0.64x (m = 16) and 0.74x (m = 64), "rows" 0.64x and 0.67x. Priced alike, the
#: batch variant's 4x16 and 8x16 blocks won over 16x16 "rows" on 16x16-pruned weights at
#: m >= 16 and ran 1.1-2.1x slower. With the batch FMAs at 1.25x, AVX-512, in one run (11:31
#: UTC): geomean regret 1.20x -> 1.16x (m = 16 1.25x -> 1.18x, m = 64 1.20x -> 1.14x), picks
#: slower than dense 1 -> 0 of 80. AVX2 (``--target x86_64``, 13:02 run): 1.15x -> 1.14x
#: (m = 16 1.21x -> 1.17x, m = 64 1.17x -> 1.15x).
BATCH_FMA_COST_X86 = 1.25

#: Machine models by target machine name (``TargetSpec.machine``). x86: a 2-core server
#: slice (AVX2 or AVX-512, measured here). aarch64 boards: NEON (4 fp32 lanes), one
#: 128-bit FMA pipe per core on the A72 and two on the A76 / Neoverse-N1, at their
#: clocks, with the sustained DRAM bandwidth of the board's memory.
MACHINES: dict[str, MachineModel] = {
    "x86_64": MachineModel(bandwidth=BANDWIDTH_X86, vector_fma_rate=FLOPS_X86 / 16, cache_bytes=CACHE_X86,
                           cache_bandwidth=CACHE_BW_X86, batch_fma_cost=BATCH_FMA_COST_X86),
    "x86_64-avx512": MachineModel(bandwidth=BANDWIDTH_X86, vector_fma_rate=FLOPS_X86 / 32, lanes=16,
                                  cache_bytes=CACHE_X86, cache_bandwidth=CACHE_BW_X86,
                                  batch_fma_cost=BATCH_FMA_COST_X86),
    "aarch64": MachineModel(bandwidth=8e9, vector_fma_rate=8e9, lanes=4, block_overhead_s=2e-9),
    "cortex-a72": MachineModel(bandwidth=4e9, vector_fma_rate=4 * 1.5e9, lanes=4, block_overhead_s=3e-9,
                               call_overhead_s=4e-6),  # Raspberry Pi 4: 4 cores, LPDDR4
    "cortex-a76": MachineModel(bandwidth=10e9, vector_fma_rate=4 * 2 * 2.4e9, lanes=4, block_overhead_s=1.5e-9,
                               call_overhead_s=3e-6),  # Raspberry Pi 5: 4 cores, LPDDR4X
    "neoverse-n1": MachineModel(bandwidth=20e9, vector_fma_rate=2 * 2 * 2.5e9, lanes=4,
                                block_overhead_s=1.2e-9),  # 2 vCPUs of a Graviton2
}


@dataclass(frozen=True)
class KernelShape:
    """What a layout costs to run: stored blocks of r x c, over nbr block rows."""

    nnz_blocks: int
    r: int
    c: int
    num_block_rows: int
    m: int
    m_tile: int
    k: int
    n: int
    variant: str = "rows"
    m_vec: int = 8
    resident: bool = False  # weights re-read by every step of a recurrent kernel
    parallel: bool = True  # on the thread pool (else no launch per recurrent step)


def estimate_time(ks: KernelShape, machine: MachineModel = MachineModel()) -> float:
    weight_bytes = ks.nnz_blocks * (ks.r * ks.c * 4 + 4) + (ks.num_block_rows + 1) * 4
    act_bytes = (ks.m * ks.k + ks.m * ks.n) * 4
    if ks.variant == "batch":  # vectors along the batch: r FMAs per block column and batch tile
        m_tiles = -(-ks.m // ks.m_vec)
        vecs = -(-ks.m_vec // machine.lanes)
        cost = machine.batch_fma_cost  # each weight broadcast feeds only vecs FMAs
        fmas = ks.nnz_blocks * ks.c * ks.r * m_tiles * vecs * cost
        loads = ks.nnz_blocks * ks.c * m_tiles * (vecs + ks.r) * cost  # x vectors + weight broadcasts
        act_bytes *= 2  # the transposed copy of x
        weight_bytes *= m_tiles  # batch tiles are the outer loop: the weights stream once per tile
    elif ks.variant in ("block", "unrolled"):  # vectors over whole blocks, against x's columns repeated r times
        m_tiles = -(-ks.m // ks.m_tile)
        vecs = -(-(ks.r * ks.c) // machine.lanes)
        fmas = ks.nnz_blocks * ks.m * vecs
        if ks.k % ks.c:  # a partial last block column: x is first copied to the block's lane order
            fmas += ks.m * ks.k * ks.r // machine.lanes
        loads = ks.nnz_blocks * vecs * (ks.m + m_tiles)  # x lanes per row + weights per tile
    else:  # vectors along the block's rows
        m_tiles = -(-ks.m // ks.m_tile)
        vecs = -(-ks.r // machine.lanes)
        fmas = ks.nnz_blocks * ks.c * ks.m * vecs
        loads = ks.nnz_blocks * ks.c * (ks.m + m_tiles * vecs)  # x broadcasts per row + weights per tile
    # A load issues in an FMA's slot as far as throughput goes: short blocks at large batch
    # (one broadcast of x per FMA) are load-bound, taller blocks reuse each broadcast.
    t_fma = max(fmas, loads) / machine.vector_fma_rate
    cached = ks.resident and machine.cache_bandwidth > 0 and weight_bytes <= machine.cache_bytes
    # activations that fit the cache are there: written by the op before (or staged by run()) and
    # read back by the next one
    act_cached = machine.cache_bandwidth > 0 and act_bytes <= machine.cache_bytes
    t_mem = (weight_bytes / (machine.cache_bandwidth if cached else machine.bandwidth)
             + act_bytes / (machine.cache_bandwidth if act_cached else machine.bandwidth))
    # "unrolled" code has no per-block overhead: no index load, no loop (char GRU 768x256, 1229
    # 4x4 blocks, a step of the recurrence: "unrolled" 1.12 us measured, 0.82 modelled for the
    # mat-vec; "block" 1.64 measured, 1.75 modelled)
    t_blocks = 0.0 if ks.variant == "unrolled" else ks.nnz_blocks * m_tiles * machine.block_overhead_s
    # a step of a recurrent kernel launches nothing unless it runs on the thread pool
    launch = machine.call_overhead_s if ks.parallel or not ks.resident else 0.0
    return max(t_mem, t_fma + t_blocks) + launch
