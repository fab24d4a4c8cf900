"""AnalyzeSparsity: measure the sparsity structure of every weight site's constant weight.

Contract
- Input: a module with site functions (``bscompile.site``, :mod:`bscompile.sites`).
- Output: the same program; every site function whose weight operands
  (:meth:`SiteKind.matrices`) are constants at its call gets a ``bscompile.sparsity``
  attribute: ``density``; ``structure`` ("dense", "all-zero", "block RxC",
  "unstructured", or "non-finite": NaN or inf, which a sparse layout would not
  propagate as dense arithmetic does, since it skips the pruned zeros); ``detected``, the pruning block ("RxC") or None; and ``blocks``,
  for every candidate block shape r x c (r, c in 1..32), ``[occupied blocks, total
  blocks, padded N, padded K]``. A site with several matrices (a GRU's two recurrent
  products) is measured as one weight, its matrices stacked along N.
- Left alone: sites whose weights are computed at run time, and sites already
  analysed (the pass is idempotent). The sites are measured on all cores.

Block-structure detection: the structure a pruner produced is the largest block
shape whose occupied blocks are (almost) entirely non-zero, i.e. the non-zeros fill
at least ``FILL`` of the values that layout stores. A 4x4-pruned matrix fills 4x4
blocks but not 8x8 ones (unless the pruned pattern happens to be 8x8-aligned), and
an unstructured one fills nothing larger than 1x1.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tvm

from bscompile.codegen.layout import BlockShape, BlockStats, all_block_stats
from bscompile.sites import SITE, SPARSITY, attr, const_array, site_calls, site_kind

FILL = 0.95


def analyze(w: np.ndarray) -> dict:
    """The ``bscompile.sparsity`` attribute of weight ``w[N, K]``."""
    nnz = int(np.count_nonzero(w))
    density = nnz / max(w.size, 1)
    stats = all_block_stats(w)
    blocks = {str(s.block): [s.nnz_blocks, s.total_blocks, *s.padded_shape] for s in stats}
    detected = None
    if not np.isfinite(w).all():
        structure = "non-finite"  # only the dense layout multiplies every value, as IEEE arithmetic would
    elif nnz == 0:
        structure = "all-zero"
    elif density >= 0.99:
        structure = "dense"
    else:
        # Fill is measured on the matrix, not its padding, so edge blocks of a shape that
        # does not divide the matrix do not count against it.
        filled = [s for s in stats if nnz / _stored_unpadded(s, w.shape) >= FILL]
        best = max(filled, key=lambda s: (s.block.r * s.block.c, s.block.r), default=None)
        detected = BlockShape(1, 1) if best is None else best.block
        structure = "unstructured" if detected == BlockShape(1, 1) else f"block {detected}"
        detected = str(detected)
    return {"density": density, "structure": structure, "detected": detected, "blocks": blocks}


def block_stats_of(sparsity: dict) -> list[BlockStats]:
    """The per-shape statistics of a ``bscompile.sparsity`` attribute."""
    return [BlockStats(BlockShape.parse(b), v[0], v[1], (v[2], v[3])) for b, v in sparsity["blocks"].items()]


def _stored_unpadded(s: BlockStats, shape) -> float:
    """Values the occupied blocks cover inside the matrix (edge blocks clipped)."""
    r, c = s.block.r, s.block.c
    n, k = shape
    full_frac = (n / s.padded_shape[0]) * (k / s.padded_shape[1])
    return max(s.nnz_blocks * r * c * full_frac, 1.0)


def site_weight(site: dict, operands) -> np.ndarray | None:
    """The site's weight (its matrices stacked along N), or None if any is computed at run time."""
    parts = [const_array(operands[mat.weight]) for mat in site_kind(site["kind"]).matrices(site)]
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


@tvm.transform.module_pass(opt_level=0, name="AnalyzeSparsity")
class AnalyzeSparsity:
    """Measure each constant-weight site's density and block structure (``bscompile.sparsity``; contract:
    module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = mod.clone()
        todo = {}  # site function -> its weight (at its first call)
        for call in site_calls(mod):
            func = mod[call.gv]
            if call.gv in todo or SPARSITY in (func.attrs or {}) or not isinstance(func, tvm.relax.Function):
                continue
            w = site_weight(attr(func, SITE), call.operands)
            if w is not None:
                todo[call.gv] = w
        if todo:  # on all cores: NumPy releases the GIL
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
                for gv, found in zip(todo, pool.map(analyze, todo.values())):
                    mod[gv] = mod[gv].with_attr(SPARSITY, found)
        return mod
