"""Weight sites: the data the passes share.

A *weight site* is one ``call_tir`` of a bscompile kernel whose callee carries the
``bscompile.site`` attribute (JSON). The frontend creates recurrent sites, the
:mod:`outline_linear_sites` pass creates linear ones; every later pass finds sites
by that attribute, so the IR stays a valid, runnable program after every phase.

Argument layout of a site's ``call_tir`` (fixed by the kernel generators):
- linear: ``[x2d, data, indices, indptr, bias]``;
- recurrent: ``[xp, data0, indices0, indptr0, rbias0, data1, indices1, indptr1, rbias1, h0, c0, lens, peep]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.family import CPU, KernelFamily
from bscompile.codegen.layout import BlockShape, BlockStats, BSRMatrix

SITE_ATTR = "bscompile.site"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")

#: Positions of (data, indices, indptr, bias) groups in a site's argument tuple.
MATRIX_ARGS = {"linear": [1], "recurrent": [1, 5]}


@dataclass
class SparsityReport:
    """What :mod:`analyze_sparsity` found in one weight."""

    shape: tuple[int, int]
    density: float
    blocks: list[BlockStats]
    structure: str  # "dense" | "all-zero" | "block RxC" | "unstructured"
    detected: BlockShape | None

    def to_json(self) -> dict:
        return {
            "density": round(self.density, 6),
            "structure": self.structure,
            "detected_block": str(self.detected) if self.detected else None,
            "zero_blocks": {str(b.block): round(1 - b.block_density, 6) for b in self.blocks},
            # zero rows/columns a layout of that block shape adds to fill its grid
            "padding": {str(b.block): [b.padded_shape[0] - self.shape[0], b.padded_shape[1] - self.shape[1]]
                        for b in self.blocks if tuple(b.padded_shape) != tuple(self.shape)},
        }


@dataclass
class LayoutDecision:
    """What :mod:`choose_layout` picked for one weight, and why."""

    layout: str  # "dense" | "bsr"
    block: BlockShape
    est_time_s: float
    dense_est_time_s: float
    reason: str
    schedule: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "layout": self.layout, "block": str(self.block),
            "est_time_us": round(self.est_time_s * 1e6, 3),
            "dense_est_time_us": round(self.dense_est_time_s * 1e6, 3),
            "reason": self.reason, "schedule": self.schedule,
        }


@dataclass
class WeightSite:
    """One constant weight matrix used by one kernel call."""

    index: int
    kind: str  # "linear" | "recurrent"
    name: str
    weight: np.ndarray  # canonical W[N, K] float32
    m: int  # rows of the activation the kernel multiplies (batch x time for linear)
    attrs: dict
    report: SparsityReport | None = None
    decision: LayoutDecision | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def to_json(self) -> dict:
        dense_bytes = self.weight.size * 4
        out = {"name": self.name, "kind": self.kind, "shape": list(self.shape), "m": self.m,
               "dense_bytes": dense_bytes}
        if self.report:
            out["sparsity"] = self.report.to_json()
        if self.decision:
            out["decision"] = self.decision.to_json()
            stored = self.attrs.get("stored_bytes")
            if stored is not None:
                out["stored_bytes"] = stored
                out["bytes_saved"] = dense_bytes - stored
        return out


@dataclass
class CompilePlan:
    """State shared by the passes of one compilation."""

    weight_names: dict[str, str]  # fingerprint -> ONNX initializer name
    kernels: KernelFamily = CPU  # generators of the target's kernels
    vector_lanes: int = 8
    sparse: bool = True  # False: bscompile's own dense path
    force_block: BlockShape | None = None  # user override for every sparse-able weight
    records: dict = field(default_factory=dict)  # "fingerprint:m" -> TuningRecord (bscompile.tune)
    sites: list[WeightSite] = field(default_factory=list)


def site_attr(mod: tvm.IRModule, call: relax.Call) -> dict | None:
    """The parsed site attribute of ``call``'s callee, or None if not a site call."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_CALL_TIR):
        return None
    gv = call.args[0]
    func = mod[gv] if gv in mod.functions else None
    if func is None or func.attrs is None or SITE_ATTR not in func.attrs:
        return None
    return json.loads(str(func.attrs[SITE_ATTR]))


def const_array(expr: relax.Expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    return None


def decode_matrix(args: list[relax.Expr], pos: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Rebuild the dense W from a site's constant (data, indices, indptr) arguments."""
    arrays = [const_array(a) for a in args[pos:pos + 3]]
    if any(a is None for a in arrays):
        return None
    data, indices, indptr = arrays
    block = BlockShape(data.shape[2], data.shape[1])
    return BSRMatrix(tuple(shape), block, data, indices, indptr).to_dense()


def site_matrices(attrs: dict) -> list[tuple[int, tuple[int, int], int]]:
    """``(arg position, W shape, row offset in the full weight)`` of each packed matrix."""
    if attrs["kind"] == "linear":
        return [(1, tuple(attrs["shape"]), 0)]
    gh, hid = attrs["shape"]
    if attrs["split"]:
        return [(1, (2 * hid, hid), 0), (5, (hid, hid), 2 * hid)]
    return [(1, (gh, hid), 0)]


def rewrite_relax_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule, before_each=None) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod``; return the builder's module.

    ``before_each(func)`` runs before a function is visited (e.g. to index its bindings).
    """
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            if before_each is not None:
                before_each(func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
