"""Compile the CUDA source of a built module with nvcc and read ptxas' resource report.

TVM 0.27 stores CUDA *source* in the module (``fmt == "cuda"``) and compiles it when
the module is loaded on the GPU machine (``tvm_callback_cuda_compile``: NVRTC via
``cuda-bindings``, or nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``). The build machine
therefore proves the artifact by compiling the very same source ahead of time, with the
flags TVM uses at load time (``--use_fast_math``, its ptxas options), for each
architecture, and records registers and spills.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class KernelResources:
    arch: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


class CudaCompileError(RuntimeError):
    pass


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (str(Path("/usr/local/cuda/bin/nvcc"))
                                     if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def cuda_sources(executable) -> list[str]:
    """The CUDA source of every cuda module imported by a built executable / module."""
    mod = getattr(executable, "mod", executable)
    out, stack = [], [mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source())
        stack.extend(m.imports)
    return out


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[KernelResources]:
    out: list[KernelResources] = []
    cur = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = KernelResources(m.group(2), m.group(1), 0, 0, 0, 0, 0)
            out.append(cur)
        elif cur is not None and (m := _FRAME.search(line)):
            cur.stack_bytes, cur.spill_stores, cur.spill_loads = (int(v) for v in m.groups())
        elif cur is not None and (m := _USED.search(line)):
            cur.registers = int(m.group(1))
            if s := _SMEM.search(m.group(2)):
                cur.smem_bytes = int(s.group(1))
    return out


def load_time_flags() -> list[str]:
    """The nvcc flags TVM compiles a CUDA module with when it is loaded on the GPU machine.

    Mirrors ``tvm.support.nvcc.compile_cuda`` (its nvcc path; NVRTC gets the same
    ``--use_fast_math`` and ptxas options), so the check compiles the code that ships:
    fast math changes the instructions, and ptxas' register-usage level the allocation.
    """
    from tvm.support import nvcc as tvm_nvcc

    return ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
            "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda",
            *([] if os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH") else ["--use_fast_math"]),
            f"--ptxas-options={','.join(tvm_nvcc._ptxas_option_flags())}"]  # includes -v


def compile_source(source: str, arch: str, nvcc: str | None = None, workdir: str | None = None,
                   timeout: float = 600) -> list[KernelResources]:
    """``nvcc -arch=<arch> -cubin -O3`` + :func:`load_time_flags`; raises :class:`CudaCompileError` on failure."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise CudaCompileError("nvcc not found")
    with tempfile.TemporaryDirectory(prefix="bscompile-nvcc-", dir=workdir) as tmp:
        cu = Path(tmp) / "module.cu"
        cu.write_text(source)
        cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", *load_time_flags(), "-o", str(Path(tmp) / "module.cubin"),
               str(cu)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise CudaCompileError(f"nvcc -arch={arch} failed:\n{proc.stderr[-4000:]}")
        return parse_ptxas(proc.stderr + proc.stdout)


def markdown_table(rows: list[tuple[str, KernelResources]]) -> str:
    lines = ["| model | arch | kernel | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for model, k in rows:
        lines.append(f"| {model} | {k.arch} | `{k.kernel}` | {k.registers} | {k.spill_stores} | "
                     f"{k.spill_loads} | {k.stack_bytes} | {k.smem_bytes} |")
    return "\n".join(lines)


def markdown_report(rows: list[tuple[str, KernelResources]], listed: Callable[[str], bool], archs: tuple[str, ...],
                    header: str) -> str:
    """``bench/results/cuda_ptxas.md``: the kernels of ``rows`` whose name is ``listed`` (the
    weight-site / recurrent ones) in a table, and the spill count over all of ``rows``."""
    ours = [(m, k) for m, k in rows if listed(k.kernel)]
    light = len(rows) - len(ours)
    spilling = sum(k.spills for _, k in rows)
    worst = max(ours, key=lambda r: r[1].registers)
    return ("# ptxas resources of bscompile's CUDA kernels\n\n"
            f"{header} (nvcc `-cubin -O3 {' '.join(load_time_flags())}`: TVM's load-time flags; archs "
            f"{', '.join(archs)}). Block-sparse / dense weight-site kernels and recurrent step kernels are listed; "
            f"{light} kernels of TVM-scheduled light ops (reshapes, stacks, activations: dlight) also compiled, "
            f"{sum(k.spills for _, k in rows if not listed(k.kernel))} of them spilling, omitted here.\n\n"
            f"Spilling kernels: {spilling}. Most registers: {worst[1].registers} "
            f"(`{worst[1].kernel}`, {worst[0]}, {worst[1].arch}).\n\n" + markdown_table(ours) + "\n")
