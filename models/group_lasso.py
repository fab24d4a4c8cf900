"""Group lasso (GL) over r×c weight blocks (Narang, Undersander, Diamos 2017).

The penalty λ_g · Σ_g ‖w_g‖₂ pushes whole blocks to zero. Alone (large λ_g) it
is weak; with a small λ_g next to block pruning it is GLP, the best block method
in the paper. ``torch.linalg.vector_norm`` has a zero sub-gradient at a zero
block, so pruned blocks give no NaN gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .sparsifier import tile


def block_norms(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """L2 norm of every r×c block of ``w``, shape ``[ceil(rows/r), ceil(cols/c)]`` (differentiable)."""
    return torch.linalg.vector_norm(tile(w, block, pad=0.0).flatten(2), dim=-1)


def group_lasso_penalty(weights: Iterable[torch.Tensor], block: tuple[int, int], lam: float) -> torch.Tensor:
    """λ_g · Σ over all blocks of all ``weights`` of ‖w_block‖₂; add it to the training loss."""
    return lam * sum(block_norms(w, block).sum() for w in weights)


def prunable_weights(model: nn.Module, config: list[dict]) -> list[torch.Tensor]:
    """The weight tensors named by a sparsifier config (``tensor_fqn`` entries)."""
    return [model.get_parameter(c["tensor_fqn"]) for c in config]
