"""Targets: short names and board presets resolve to a TVM target JSON plus what the
rest of bscompile needs to know about it. Adding a target is a table entry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import tvm
from tvm.target import codegen

from bscompile.errors import BscompileError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    target: dict  # TVM target JSON
    device: str = "cpu"  # runtime device kind: "cpu" | "cuda"
    vector_lanes: int = 8  # fp32 lanes of the CPU's vector registers
    cross_compiler: str | None = None  # C++ compiler that links the module, when not the host's
    description: str = ""

    @property
    def arch(self) -> str:
        """CPU architecture of the module's host code: x86_64 or aarch64."""
        host = self.target.get("host", self.target)
        return "aarch64" if "aarch64" in str(host.get("mtriple", "")) else "x86_64"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.target)


def _host_cpu() -> TargetSpec:
    cpu = codegen.llvm_get_system_cpu()
    # The wheel's default triple (x86_64-conda-linux-gnu) rejects -mcpu; name the real one.
    tgt = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}
    lanes = 16 if codegen.llvm_cpu_has_features("avx512f", tvm.target.Target(tgt)) else 8
    return TargetSpec("llvm", tgt, vector_lanes=lanes, description=f"this machine's CPU ({cpu})")


def _aarch64(name: str, cpu: str | None, description: str) -> TargetSpec:
    tgt = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if cpu:
        tgt["mcpu"] = cpu
    return TargetSpec(name, tgt, vector_lanes=4, cross_compiler="aarch64-linux-gnu-g++", description=description)


#: Named targets. Values are factories so that host detection runs only when asked for.
TARGETS: dict[str, callable] = {
    "llvm": _host_cpu,
    "x86_64": lambda: TargetSpec("x86_64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
                                 description="any x86-64 CPU with AVX2 + FMA"),
    "aarch64": lambda: _aarch64("aarch64", None, "generic ARMv8-A with NEON"),
    "rpi4": lambda: _aarch64("rpi4", "cortex-a72", "Raspberry Pi 4 (Cortex-A72)"),
    "cortex-a72": lambda: _aarch64("cortex-a72", "cortex-a72", "Cortex-A72"),
    "cortex-a76": lambda: _aarch64("cortex-a76", "cortex-a76", "Cortex-A76 (e.g. Raspberry Pi 5)"),
    "graviton2": lambda: _aarch64("graviton2", "neoverse-n1", "AWS Graviton2 (Neoverse-N1)"),
    "neoverse-n1": lambda: _aarch64("neoverse-n1", "neoverse-n1", "Neoverse-N1"),
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
        if not codegen.llvm_is_valid_cpu(cpu, tvm.target.Target(tgt)):
            raise BscompileError(f"LLVM does not know CPU '{cpu}' for {spec.arch}")
        spec = TargetSpec(spec.name, tgt, spec.device, spec.vector_lanes, spec.cross_compiler, f"{spec.arch} {cpu}")
    return spec


def _from_json(target: str | dict) -> TargetSpec:
    try:
        tgt = json.loads(target) if isinstance(target, str) else dict(target)
        tvm.target.Target(tgt)
    except Exception as err:  # noqa: BLE001 - TVM raises several types
        raise BscompileError(f"invalid target JSON: {str(err).strip().splitlines()[-1]}") from None
    kind = tgt.get("kind")
    if kind != "llvm":
        raise BscompileError(f"target kind '{kind}' is not supported (yet); supported: llvm")
    if "aarch64" in str(tgt.get("mtriple", "")):
        return TargetSpec("aarch64", tgt, vector_lanes=4, cross_compiler="aarch64-linux-gnu-g++")
    return TargetSpec("llvm", tgt)
