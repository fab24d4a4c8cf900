"""Targets: short names and board presets resolve to a TVM target JSON plus what the
rest of bscompile needs to know about it. Adding a target is a table entry."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tvm
from tvm.target import codegen

from bscompile.codegen.cpu_cost import MACHINES
from bscompile.errors import BscompileError
from bscompile.runtime.threads import physical_cores

if TYPE_CHECKING:
    from bscompile.codegen.family import KernelFamily


@dataclass(frozen=True)
class TargetSpec:
    name: str
    target: dict  # TVM target JSON
    device: str = "cpu"  # runtime device kind: "cpu" | "cuda"
    vector_lanes: int = 8  # fp32 lanes of the CPU's vector registers
    cross_compiler: str | None = None  # C++ compiler that links the module, when not the host's
    description: str = ""
    persistent_rnn: bool = False  # cuda: recurrent layers on the opt-in persistent kernel
    #: cores of the machine the kernels will run on, where the target names one (this machine, a board,
    #: a cloud instance); 0 where it names only a CPU (a preset, --cpu, a JSON dict)
    cores: int = 0

    @property
    def arch(self) -> str:
        """CPU architecture of the module's host code: x86_64 or aarch64."""
        host = self.target.get("host", self.target)
        return "aarch64" if "aarch64" in str(host.get("mtriple", "")) else "x86_64"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.target)

    @property
    def machine(self) -> str:
        """The machine model's name: the GPU architecture, the board's CPU, or the x86 class."""
        if self.device == "cuda":
            return self.target["arch"]
        if self.arch == "aarch64":
            cpu = self.target.get("mcpu")
            return cpu if cpu in MACHINES else "aarch64"
        return "x86_64-avx512" if self.vector_lanes == 16 else "x86_64"

    def kernel_family(self) -> KernelFamily:
        """The kernels, schedule space and machine model this target compiles with. (Imported here:
        what only names or runs a target, such as the remote tuner's client, loads no generator.)"""
        from bscompile.codegen.cpu import CpuFamily
        from bscompile.codegen.cuda_family import CudaFamily

        if self.device == "cuda":
            return CudaFamily.for_arch(self.machine, self.persistent_rnn)
        return CpuFamily(dataclasses.replace(MACHINES[self.machine], cores=self.cores))


#: Architectures of the LLVM triples bscompile builds and links for (Linux ELF).
TRIPLE_ARCHS = ("x86_64", "aarch64")


def _check_triple(tgt: dict) -> None:
    """Refuse a triple bscompile cannot build for (an unknown one crashed LLVM; others failed to link)."""
    triple = str(tgt.get("mtriple") or "x86_64-linux-gnu")
    if triple.split("-")[0] not in TRIPLE_ARCHS or "linux" not in triple:
        raise BscompileError(f"target triple '{triple}' is not supported: bscompile builds for "
                             + " and ".join(f"{a}-linux-gnu" for a in TRIPLE_ARCHS))


def _check_cpu(tgt: dict) -> None:
    """Refuse an ``mcpu`` LLVM does not know for the triple (LLVM would log and fall back to generic)."""
    cpu, triple = tgt.get("mcpu"), str(tgt.get("mtriple") or "x86_64-linux-gnu")
    if isinstance(cpu, str) and cpu and not codegen.llvm_is_valid_cpu(cpu, triple):
        raise BscompileError(f"LLVM does not know CPU '{cpu}' for {triple.split('-')[0]}")


def _x86_lanes(tgt: dict) -> int:
    """fp32 lanes of an x86 LLVM target's widest vectors: 16 where its CPU has AVX-512."""
    return 16 if codegen.llvm_cpu_has_features("avx512f", tvm.target.Target(tgt)) else 8


def _host_cpu() -> TargetSpec:
    cpu = codegen.llvm_get_system_cpu()
    # The wheel's default triple (x86_64-conda-linux-gnu) rejects -mcpu; name the real one.
    tgt = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}
    return TargetSpec("llvm", tgt, vector_lanes=_x86_lanes(tgt), description=f"this machine's CPU ({cpu})",
                      cores=physical_cores())


def _aarch64(name: str, cpu: str | None, description: str, cores: int = 0) -> TargetSpec:
    tgt = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if cpu:
        tgt["mcpu"] = cpu
    return TargetSpec(name, tgt, vector_lanes=4, cross_compiler="aarch64-linux-gnu-g++", description=description,
                      cores=cores)


#: GPU architectures ``--arch`` accepts (Ampere A100, Jetson Orin, Ada, Hopper H100).
CUDA_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
#: Default CUDA architecture: sm_80 (A100). Its code also runs on later GPUs (sm_86/89/90)
#: through the driver; pass ``--arch sm_90`` to compile natively for an H100.
DEFAULT_CUDA_ARCH = "sm_80"
_CUDA_GPUS = {"sm_80": "A100", "sm_86": "RTX 30xx / A10", "sm_87": "Jetson Orin", "sm_89": "L4 / RTX 40xx",
              "sm_90": "H100 / H200"}


def _check_cuda_arch(arch: str) -> None:
    if arch not in CUDA_ARCHS:
        raise BscompileError(f"unknown CUDA architecture '{arch}'; known: {', '.join(CUDA_ARCHS)}")


def _cuda(arch: str = DEFAULT_CUDA_ARCH) -> TargetSpec:
    """NVIDIA GPU; the host code (VM, kernel launches) is x86-64 (aarch64 for Jetson Orin)."""
    _check_cuda_arch(arch)
    triple = "aarch64-linux-gnu" if arch == "sm_87" else "x86_64-linux-gnu"
    tgt = {"kind": "cuda", "arch": arch, "host": {"kind": "llvm", "mtriple": triple}}
    cross = "aarch64-linux-gnu-g++" if arch == "sm_87" else None
    return TargetSpec("cuda", tgt, device="cuda", cross_compiler=cross,
                      description=f"NVIDIA GPU, {arch} ({_CUDA_GPUS[arch]}); --arch to change")


def with_arch(target: str | dict | TargetSpec, arch: str) -> TargetSpec:
    """``--arch``: the cuda target (short name or JSON) for GPU architecture ``arch`` (e.g. sm_90)."""
    arch = arch.strip().lower()
    if not arch.startswith("sm_"):
        arch = f"sm_{arch}"
    spec = target if isinstance(target, TargetSpec) else resolve_target(target)
    if spec.device != "cuda":
        raise BscompileError(f"--arch applies to the cuda target, not '{spec.name}'")
    if spec.name == "cuda" and spec.target.get("host", {}).get("mtriple") in (None, "x86_64-linux-gnu",
                                                                            "aarch64-linux-gnu"):
        return _cuda(arch)
    return _from_json(dict(spec.target, arch=arch))  # (checks the arch)


def with_persistent_rnn(target: str | dict | TargetSpec) -> TargetSpec:
    """``--persistent-rnn``: the cuda target with recurrent layers on the persistent kernel."""
    spec = target if isinstance(target, TargetSpec) else resolve_target(target)
    if spec.device != "cuda":
        raise BscompileError(f"--persistent-rnn applies to the cuda target, not '{spec.name}'")
    return dataclasses.replace(spec, persistent_rnn=True)


#: Named targets. Values are factories so that host detection runs only when asked for.
TARGETS: dict[str, callable] = {
    "llvm": _host_cpu,
    "x86_64": lambda: TargetSpec("x86_64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
                                 description="any x86-64 CPU with AVX2 + FMA"),
    "aarch64": lambda: _aarch64("aarch64", None, "generic ARMv8-A with NEON"),
    "rpi4": lambda: _aarch64("rpi4", "cortex-a72", "Raspberry Pi 4 (Cortex-A72)", cores=4),
    "cortex-a72": lambda: _aarch64("cortex-a72", "cortex-a72", "Cortex-A72"),
    "cortex-a76": lambda: _aarch64("cortex-a76", "cortex-a76", "Cortex-A76 (e.g. Raspberry Pi 5)"),
    "graviton2": lambda: _aarch64("graviton2", "neoverse-n1", "AWS Graviton2 (Neoverse-N1)", cores=2),
    "neoverse-n1": lambda: _aarch64("neoverse-n1", "neoverse-n1", "Neoverse-N1"),
    "cuda": _cuda,
}


def resolve_target(target: str | dict | TargetSpec, cpu: str | None = None) -> TargetSpec:
    """A short name, a preset, or a TVM target JSON (dict or string) -> :class:`TargetSpec`."""
    if isinstance(target, TargetSpec):
        spec = target
    elif isinstance(target, dict) or (isinstance(target, str) and target.strip().startswith("{")):
        spec = _from_json(target)
    elif target in TARGETS:
        spec = TARGETS[target]()
    else:
        raise BscompileError(f"unknown target '{target}'; known: {', '.join(TARGETS)} or a TVM target JSON dict")
    if cpu:
        if spec.target.get("kind") != "llvm":
            raise BscompileError(f"--cpu applies to CPU targets, not '{spec.name}'")
        tgt = dict(spec.target, mcpu=cpu)
        _check_cpu(tgt)
        lanes = _x86_lanes(tgt) if spec.arch == "x86_64" else spec.vector_lanes
        spec = TargetSpec(spec.name, tgt, spec.device, lanes, spec.cross_compiler, f"{spec.arch} {cpu}")
    return spec


def _from_json(target: str | dict) -> TargetSpec:
    try:
        tgt = json.loads(target) if isinstance(target, str) else dict(target)
        if tgt.get("kind") == "cuda":  # without an arch TVM probes for a local GPU
            tgt.setdefault("arch", DEFAULT_CUDA_ARCH)
            tgt.setdefault("host", {"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
        if tgt.get("kind") == "llvm":  # before TVM, which logs an unknown CPU and falls back to generic
            _check_triple(tgt)
            _check_cpu(tgt)
        host = tgt.get("host")
        if tgt.get("kind") == "cuda":
            host = json.loads(host) if isinstance(host, str) else host
            _check_triple(host)
            _check_cuda_arch(tgt["arch"])
        tvm.target.Target(tgt)
    except BscompileError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises several types
        raise BscompileError(f"invalid target JSON: {str(err).strip().splitlines()[-1]}") from None
    kind = tgt.get("kind")
    if kind == "cuda":
        cross = "aarch64-linux-gnu-g++" if "aarch64" in str(host.get("mtriple", "")) else None
        arch = tgt["arch"]
        return TargetSpec("cuda", tgt, device="cuda", cross_compiler=cross, description=f"NVIDIA GPU, {arch}")
    if kind != "llvm":
        raise BscompileError(f"target kind '{kind}' is not supported (yet); supported: llvm, cuda")
    if "aarch64" in str(tgt.get("mtriple", "")):
        return TargetSpec("aarch64", tgt, vector_lanes=4, cross_compiler="aarch64-linux-gnu-g++")
    return TargetSpec("llvm", tgt, vector_lanes=_x86_lanes(tgt))
