"""The TVM build step: bscompile's lowered module -> a TVM executable for the target."""

from __future__ import annotations

import tvm

from bscompile.target import TargetSpec


def build(mod: tvm.IRModule, spec: TargetSpec) -> tvm.runtime.Executable:
    """Run TVM's default Relax build pipeline (legalise, fuse, VM codegen) for ``spec``.

    Weight-site kernels arrive fully scheduled; what TVM legalises here are the
    light ops around them (activations, reshapes, gathers, concatenations).
    """
    target = spec.tvm_target()
    with target:
        return tvm.compile(mod, target=target)
