"""Weight pruning (WP) and block pruning (BP) on ``torch.ao.pruning.BaseSparsifier``.

WP is BP with 1×1 blocks. Masks are kept as tensors in ``sparsifier.state`` and
applied in place (``w.mul_(mask)``) in :meth:`BlockPruner.step`, which is called
right after ``optimizer.step()``. We do not use the parametrizations of
``torch.ao.pruning``: a parametrized ``weight_hh_l0`` is no longer a leaf of
``nn.GRU._flat_weights``, which breaks the fused RNN kernels (cuDNN / the flat
weight checks) and ONNX export of recurrent ops. In-place masks work the same
for ``nn.Linear``, ``nn.GRU``, ``nn.LSTM`` and ``nn.RNN``.

Usage::

    sp = BlockPruner(PruneSchedule(start_itr=200, ramp_itr=1200, end_itr=2000, freq=20),
                     block=(4, 4), target_sparsity=0.9)
    sp.prepare(model, make_config(model))
    for batch in data:
        loss.backward(); opt.step(); sp.step()
    sp.squash_mask()          # exact zeros left in the weights, masks forgotten
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier

from .schedule import PruneSchedule, score_quantile

Reduction = Literal["max", "mean", "rms", "geomean", "median"]
REDUCTIONS: tuple[str, ...] = ("max", "mean", "rms", "geomean", "median")
RNN_TYPES = (nn.RNN, nn.GRU, nn.LSTM)


def tile(w: torch.Tensor, block: tuple[int, int], pad: float = 0.0) -> torch.Tensor:
    """View a 2-D weight as blocks ``[rows/r, cols/c, r, c]``; ragged edges padded with ``pad``."""
    r, c = block
    rows, cols = w.shape
    pr, pc = -rows % r, -cols % c
    if pr or pc:
        w = nn.functional.pad(w, (0, pc, 0, pr), value=pad)
    return w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).permute(0, 2, 1, 3)


def block_scores(w: torch.Tensor, block: tuple[int, int], reduction: Reduction = "max") -> torch.Tensor:
    """One score per r×c block of |w|, shape ``[ceil(rows/r), ceil(cols/c)]``.

    ``max`` is the paper's choice; mean, RMS, geometric mean and median are the
    alternatives it names as future work. Padding of ragged edge blocks is NaN and
    ignored, so an edge block is scored on its real weights only.
    """
    t = tile(w.detach().abs().float(), block, pad=math.nan).flatten(2)
    if reduction == "max":
        return t.nan_to_num(nan=-math.inf).amax(-1)
    if reduction == "mean":
        return t.nanmean(-1)
    if reduction == "rms":
        return t.square().nanmean(-1).sqrt()
    if reduction == "geomean":
        return t.log().nanmean(-1).exp()  # log 0 = -inf: a block with a zero scores 0
    if reduction == "median":
        return t.nanmedian(-1).values
    raise ValueError(f"unknown reduction {reduction!r}; choose from {REDUCTIONS}")


def expand_blocks(block_mask: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Element mask of ``shape`` from a per-block mask (ragged edges cropped)."""
    r, c = block
    return block_mask.repeat_interleave(r, 0).repeat_interleave(c, 1)[: shape[0], : shape[1]]


def make_config(
    model: nn.Module,
    linear: bool = True,
    input_overrides: dict[str, Any] | None = None,
    recurrent_overrides: dict[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Sparsifier config for every Linear weight and every RNN input/recurrent weight.

    Covers ``weight_ih_l{k}[_reverse]`` / ``weight_hh_l{k}[_reverse]`` of all layers
    and directions; biases and embeddings are never pruned. ``input_overrides`` and
    ``recurrent_overrides`` give input and recurrent weights their own
    hyper-parameters (e.g. another ``schedule``), as Narang et al. allow.
    Modules whose name starts with an entry of ``exclude`` are skipped.
    """
    config: list[dict[str, Any]] = []
    for name, mod in model.named_modules():
        if any(name.startswith(e) for e in exclude if e):
            continue
        if isinstance(mod, RNN_TYPES):
            for pname, p in mod.named_parameters(recurse=False):
                if pname.startswith("weight_ih"):
                    config.append({"tensor_fqn": f"{name}.{pname}", **(input_overrides or {})})
                elif pname.startswith("weight_hh"):
                    config.append({"tensor_fqn": f"{name}.{pname}", **(recurrent_overrides or {})})
        elif linear and isinstance(mod, nn.Linear):
            config.append({"tensor_fqn": f"{name}.weight", **(input_overrides or {})})
    return config


class BlockPruner(BaseSparsifier):
    """Gradual magnitude pruning of r×c blocks (WP when ``block=(1, 1)``).

    Every group carries its own ``schedule`` (a :class:`PruneSchedule`), ``block``,
    ``reduction`` and optionally ``target_sparsity``; the constructor arguments are
    the defaults. If a schedule has no θ, it is derived when pruning starts:

    * paper mode (``target_sparsity=None``): q = ``percentile`` (0.9) quantile of
      the layer's block scores at the first update, θ from the paper's formula.
    * target mode: θ is re-derived at every update so that the schedule would end at
      the ``target_sparsity`` quantile of the *current* block scores (weights
      grow while training, so θ fixed at start undershoots badly). We never
      prune past the target at an update, and at ``end_itr`` prune the
      lowest-scoring remaining blocks until the pruned *weights* (ragged edge
      blocks count for what they hold) are closest to ``target · numel``.

    A masked block never comes back (masks are and-ed). ``self.state[fqn]`` holds
    ``mask`` (bool, weight-shaped), ``block_mask`` and ``history`` —
    ``(itr, threshold, sparsity)`` at every update — for plots and reports.
    """

    def __init__(
        self,
        schedule: PruneSchedule,
        block: tuple[int, int] = (1, 1),
        reduction: Reduction = "max",
        target_sparsity: float | None = None,
        percentile: float = 0.9,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose from {REDUCTIONS}")
        if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
            raise ValueError("target_sparsity must be in [0, 1)")
        super().__init__(
            defaults={
                "schedule": schedule,
                "block": tuple(block),
                "reduction": reduction,
                "target_sparsity": target_sparsity,
                "percentile": percentile,
            }
        )
        self.itr = 0
        self.squashed = False

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None) -> None:
        """Attach masks (all ones) to the weights of ``config`` (default: :func:`make_config`)."""
        super().prepare(model, config if config is not None else make_config(model))

    def _prepare(self, *args: Any, **kwargs: Any) -> None:
        for g in self.groups:
            w = getattr(g["module"], g["tensor_name"])
            if w.dim() != 2:
                raise ValueError(f"{g['tensor_fqn']}: only 2-D weights can be pruned, got {tuple(w.shape)}")
            g["schedule"] = copy.deepcopy(g["schedule"])
            g["block"] = tuple(g["block"])
            nbr, nbc = math.ceil(w.shape[0] / g["block"][0]), math.ceil(w.shape[1] / g["block"][1])
            st = self.state[g["tensor_fqn"]]
            st["block_mask"] = torch.ones(nbr, nbc, dtype=torch.bool, device=w.device)
            st["mask"] = torch.ones_like(w, dtype=torch.bool)
            st["history"] = []

    def step(self, use_path: bool = True) -> None:  # noqa: ARG002 - BaseSparsifier signature
        """Advance one training iteration: update masks on schedule, then re-apply all masks."""
        if self.squashed:
            return
        self.itr += 1
        if self.enable_mask_update:
            with torch.no_grad():
                for g in self.groups:
                    if g["schedule"].is_update_itr(self.itr):
                        self.update_mask(**g)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights in place (keeps RNN flat weights intact)."""
        for g in self.groups:
            getattr(g["module"], g["tensor_name"]).mul_(self.state[g["tensor_fqn"]]["mask"])

    def update_mask(
        self,
        module: nn.Module,
        tensor_name: str,
        schedule: PruneSchedule,
        block: tuple[int, int],
        reduction: Reduction,
        target_sparsity: float | None,
        percentile: float,
        tensor_fqn: str,
        **kwargs: Any,
    ) -> None:
        st = self.state[tensor_fqn]
        scores = block_scores(getattr(module, tensor_name), block, reduction)
        if target_sparsity is not None or schedule.theta is None:
            # paper mode: θ once, from the scores at the first update; target mode: θ again at
            # every update from the current scores (pruned blocks score 0), so the ramp ends at
            # the target quantile of the weights as they are then, not as they were at start
            q = score_quantile(scores, target_sparsity if target_sparsity is not None else percentile)
            new = schedule.with_theta_for(q)
            schedule.theta, schedule.phi = new.theta, new.phi
        eps = schedule.threshold(self.itr)
        if st["history"]:  # re-derived θ may shrink when weights do; ε itself never decreases
            eps = max(eps, st["history"][-1][1])
        keep = st["block_mask"] & (scores >= eps)
        if target_sparsity is not None:
            sizes = tile(torch.ones_like(st["mask"], dtype=torch.float), block).sum((-1, -2))
            n_target = target_sparsity * sizes.sum()  # in weights: ragged edge blocks are smaller
            n_pruned = sizes[~keep].sum()
            final = self.itr >= schedule.end_itr
            if n_pruned > n_target or (final and n_pruned < n_target):
                keep = self._prune_to(scores, st["block_mask"], sizes, float(n_target))
        st["block_mask"] = keep
        st["mask"] = expand_blocks(keep, block, st["mask"].shape)
        st["history"].append((self.itr, eps, float((~st["mask"]).float().mean())))

    @staticmethod
    def _prune_to(scores: torch.Tensor, kept: torch.Tensor, sizes: torch.Tensor, n_target: float) -> torch.Tensor:
        """Prune the lowest-scoring blocks until the pruned weight count is closest to ``n_target``.

        Already pruned blocks come first in the order, so none is ever revived.
        """
        order = scores.masked_fill(~kept, -math.inf).flatten().argsort(stable=True)
        pruned_before = torch.cat([sizes.new_zeros(1), sizes.flatten()[order].cumsum(0)])
        n = int((pruned_before - n_target).abs().argmin())
        n = max(n, int((~kept).sum()))
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[order[:n]] = False
        return keep.view_as(kept)

    def state_dict(self) -> dict[str, Any]:
        """Masks, histories, per-group settings (θ included) and the iteration count."""
        return {**super().state_dict(), "itr": self.itr}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore into a sparsifier already ``prepare``-d on the same model (no parametrizations)."""
        saved = {g["tensor_fqn"]: g for g in state_dict["groups"]}
        if strict and saved.keys() != {g["tensor_fqn"] for g in self.groups}:
            raise RuntimeError("sparsifier groups differ from the saved ones")
        for g in self.groups:
            g.update(copy.deepcopy(saved.get(g["tensor_fqn"], {})))
        self.state.update(copy.deepcopy(state_dict["state"]))
        self.itr = state_dict["itr"]
        self.apply_masks()

    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """Leave exact zeros in the weights and stop masking; masks stay in ``state``."""
        self.apply_masks()
        self.squashed = True

    def sparsity(self) -> dict[str, float]:
        """Fraction of zero weights per pruned tensor, measured on the weights themselves."""
        return {
            g["tensor_fqn"]: float((getattr(g["module"], g["tensor_name"]) == 0).float().mean())
            for g in self.groups
        }

    def overall_sparsity(self) -> float:
        """Zero fraction over all pruned tensors together."""
        ws = [getattr(g["module"], g["tensor_name"]) for g in self.groups]
        return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def prune_once(
    model: nn.Module,
    target_sparsity: float,
    block: tuple[int, int] = (4, 4),
    reduction: Reduction = "max",
    config: list[dict[str, Any]] | None = None,
) -> BlockPruner:
    """One-shot magnitude pruning to exactly ``target_sparsity`` (no training), squashed.

    For benchmark models with random weights, where a schedule has nothing to act on.
    """
    pruner = BlockPruner(PruneSchedule(0, 0, 1, 1), block, reduction, target_sparsity)
    pruner.prepare(model, config)
    pruner.step()
    pruner.squash_mask()
    return pruner
