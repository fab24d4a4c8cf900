"""The CUDA family's machine model: a roofline of the warp-per-block-row kernels of :mod:`codegen.cuda`.

A linear kernel runs one warp per block row (``warps`` per thread block, one thread
block column per batch tile of ``m_tile`` rows). Its time is a kernel launch plus the
larger of
- memory: the stored blocks (values and indices) streamed once per batch tile from
  HBM -- or from L2 when the whole weight fits there (every batch tile after the first,
  every time step of a recurrent layer) -- plus the activations, at a bandwidth that
  needs enough warps in flight to saturate (about 16 per SM: a small layer is
  latency-bound, not bandwidth-bound), and
- compute: the FMAs over the SMs' fp32 rate, plus a per-block cost (index load and
  the shuffle reduction of the lanes that split a block row).
A recurrent site pays one launch per time step with its weights L2-resident.
The numbers are the vendors' published ones; ``bench/gpu.py`` measures the kernels
when a GPU is available, and ``bscompile tune`` replaces the model by measurement there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    name: str
    sms: int
    hbm_bandwidth: float  # bytes/s
    l2_bytes: int
    l2_bandwidth: float  # bytes/s
    fma_rate: float  # fp32 FMAs/s, all SMs
    launch_s: float = 4e-6  # kernel launch as seen by a stream of back-to-back launches
    warps_to_saturate: int = 16  # warps in flight per SM to reach full bandwidth
    block_overhead_s: float = 2e-12  # per stored block, spread over the SMs


#: By CUDA architecture (``--arch``): A100 40GB, A10, Jetson AGX Orin, L4, H100 SXM.
GPUS: dict[str, GpuModel] = {
    "sm_80": GpuModel("A100", 108, 1.55e12, 40 << 20, 5e12, 9.7e12),
    "sm_86": GpuModel("A10", 72, 600e9, 6 << 20, 2e12, 15.6e12),
    "sm_87": GpuModel("Jetson AGX Orin", 16, 204e9, 4 << 20, 0.6e12, 2.6e12, launch_s=8e-6),
    "sm_89": GpuModel("L4", 58, 300e9, 48 << 20, 2e12, 15e12),
    "sm_90": GpuModel("H100 SXM", 132, 3.35e12, 50 << 20, 10e12, 33.5e12),
}


def estimate_time(gpu: GpuModel, *, nnz_blocks: int, r: int, c: int, num_block_rows: int, m: int, m_tile: int,
                  n: int, k: int, recurrent_steps: int = 0) -> float:
    """Seconds per call (per time step for ``recurrent_steps`` > 0, times the steps)."""
    weight_bytes = nnz_blocks * (r * c * 4 + 4) + (num_block_rows + 1) * 4
    act_bytes = (m * k + m * n) * 4
    tiles = -(-m // m_tile)
    fits_l2 = weight_bytes <= gpu.l2_bytes // 2
    first = weight_bytes / (gpu.l2_bandwidth if recurrent_steps and fits_l2 else gpu.hbm_bandwidth)
    rest = (tiles - 1) * weight_bytes / (gpu.l2_bandwidth if fits_l2 else gpu.hbm_bandwidth)
    warps = num_block_rows * tiles
    occupancy = min(1.0, warps / (gpu.sms * gpu.warps_to_saturate))
    t_mem = (first + rest + act_bytes / gpu.hbm_bandwidth) / max(occupancy, 1e-3)
    t_fma = nnz_blocks * r * c * m / gpu.fma_rate + nnz_blocks * tiles * gpu.block_overhead_s
    per_call = gpu.launch_s + max(t_mem, t_fma)
    return per_call * max(recurrent_steps, 1)
