"""Kernel families: the generators a target uses for weight sites.

A family turns a layout (:class:`BSRMatrix`) and a schedule into TIR for the two
site kinds. The passes only talk to this interface, so a new target brings its
own family and nothing else in the pipeline changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import tvm

from bscompile.codegen import cpu, cuda
from bscompile.codegen.layout import BSRMatrix
from bscompile.codegen.recurrent_cells import CellSpec


@dataclass(frozen=True)
class KernelFamily:
    name: str
    #: (matrix, m, schedule) -> PrimFunc computing y[m, N] = x[m, K] @ W.T + bias
    linear: Callable[[BSRMatrix, int, Any], tvm.tirx.PrimFunc]
    #: (cell, matrices, seq, batch, schedules) -> PrimFunc of one recurrent direction
    recurrent: Callable[[CellSpec, list[BSRMatrix], int, int, list[Any]], tvm.tirx.PrimFunc]
    #: (matrix, m, vector_lanes, recurrent=False) -> schedule
    default_schedule: Callable[[BSRMatrix, int, int], Any]
    #: schedule JSON (as recorded in manifests and tuning records) -> schedule
    schedule_from_json: Callable[[dict], Any]


CPU = KernelFamily("cpu", cpu.linear_kernel, cpu.recurrent_kernel, cpu.default_schedule,
                   lambda d: cpu.CpuSchedule(**d))

CUDA = KernelFamily("cuda", cuda.linear_kernel, cuda.recurrent_kernel, cuda.default_schedule,
                    cuda.CudaSchedule.from_json)

FAMILIES: dict[str, KernelFamily] = {"cpu": CPU, "cuda": CUDA}


def family_for(device: str) -> KernelFamily:
    return FAMILIES[device]
