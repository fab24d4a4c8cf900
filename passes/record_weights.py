"""RecordWeights: the manifest's weight entries, recorded in the module as the pipeline decided them.

Kernels of sites that generate the same code are merged later (``ShareIdenticalKernels``),
which drops the merged kernels' site attributes; the manifest is read from this record in the
final IR, not from the IR before that pass.

Contract
- Input: the module after bscompile's passes and TVM's lowering (sites are kernels carrying
  ``bscompile.site``, ``bscompile.layout``, ``bscompile.sparsity``; a fused loop kernel lists
  its sites in ``bscompile.inlined_sites``), so the entries follow the program's order.
- Output: the same module with the attribute ``bscompile.weights`` (:data:`bscompile.sites.WEIGHTS`):
  the JSON text of :func:`bscompile.sites.weight_entries`, one entry per site call in
  program order. Running it again records the same entries (idempotent); a module whose
  record is already there and whose entries would differ (kernels merged since) keeps it.
"""

from __future__ import annotations

import json

import tvm

from bscompile.sites import WEIGHTS, weight_entries


@tvm.transform.module_pass(opt_level=0, name="RecordWeights")
class RecordWeights:
    """Record the manifest's weight entries as a module attribute (contract: module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if mod.attrs is not None and WEIGHTS in mod.attrs:
            return mod
        return mod.with_attr(WEIGHTS, json.dumps(weight_entries(mod)))
