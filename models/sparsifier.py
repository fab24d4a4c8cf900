"""Weight pruning (WP) and block pruning (BP) as a ``torch.ao.pruning.BaseSparsifier``.

WP is BP with 1×1 blocks. The group keys follow ``WeightNormSparsifier``:
``sparsity_level`` (fraction of the weights to prune) and ``sparse_block_shape``
(``(rows, cols)`` of a block), so ``torch.ao.pruning``'s schedulers (``CubicSL``,
``LambdaSL``) drive it directly; :class:`~.schedule.NarangSL` is the threshold
schedule of Narang et al. as such a scheduler. Two more group keys:

* ``reduction`` — how a block becomes one score (``max`` of |w| in the paper).
* ``threshold`` — ``None``: prune the lowest-scoring blocks until
  ``sparsity_level`` of the weights are pruned (target mode). A number ε: prune
  the blocks scoring below ε, never past ``sparsity_level`` (threshold mode, set by
  :class:`~.schedule.NarangSL`).

Masks are monotone (a pruned block never comes back), kept as bool tensors in
``sparsifier.state[fqn]["mask"]`` and applied in place (``w.mul_(mask)``) at every
:meth:`BlockPruner.step`, called right after ``optimizer.step()``. We do not use
``torch.ao``'s parametrizations: a parametrized ``weight_hh_l0`` is no longer a leaf
of ``nn.GRU._flat_weights``, which breaks the fused RNN kernels and the ONNX export
of recurrent ops. In-place masks work the same for ``nn.Linear``, ``nn.GRU``,
``nn.LSTM`` and ``nn.RNN``.

Usage (``torch.ao`` order: optimizer, sparsifier, scheduler)::

    sp = BlockPruner(sparsity_level=0.9, sparse_block_shape=(4, 4))
    sp.prepare(model, make_config(model))
    sched = NarangSL(sp, start_itr=200, ramp_itr=1200, end_itr=2000, freq=20)  # or CubicSL(sp, ...)
    for batch in data:
        loss.backward(); opt.step(); sp.step(); sched.step()
    sp.squash_mask()          # exact zeros left in the weights, masks no longer applied
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning.sparsifier.utils import swap_module

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


def score_quantile(scores: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a score tensor (torch.quantile has an input-size limit)."""
    return float(np.quantile(scores.detach().flatten().double().cpu().numpy(), q))


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
    ``recurrent_overrides`` give input and recurrent weights their own group keys
    (e.g. ``sparse_block_shape`` or ``sparsity_level``), as Narang et al. allow.
    Modules whose name starts with an entry of ``exclude`` are skipped.
    """
    config: list[dict[str, Any]] = []
    fqn = lambda mod_name, p: f"{mod_name}.{p}" if mod_name else p  # noqa: E731 - the root module has name ""
    for name, mod in model.named_modules():
        if any(name.startswith(e) for e in exclude if e):
            continue
        if isinstance(mod, RNN_TYPES):
            for pname, _ in mod.named_parameters(recurse=False):
                if pname.startswith("weight_ih"):
                    config.append({"tensor_fqn": fqn(name, pname), **(input_overrides or {})})
                elif pname.startswith("weight_hh"):
                    config.append({"tensor_fqn": fqn(name, pname), **(recurrent_overrides or {})})
        elif linear and isinstance(mod, nn.Linear):
            config.append({"tensor_fqn": fqn(name, "weight"), **(input_overrides or {})})
    return config


def restore_groups(sp: BaseSparsifier, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Group keys and state of ``state_dict`` into ``sp``, already ``prepare``-d on the same model.

    ``BaseSparsifier.load_state_dict`` would register ``torch.ao``'s parametrizations, which the
    sparsifiers here do not use (see the module docstring)."""
    saved = {g["tensor_fqn"]: g for g in state_dict["groups"]}
    if strict and saved.keys() != {g["tensor_fqn"] for g in sp.groups}:
        raise RuntimeError("sparsifier groups differ from the saved ones")
    for g in sp.groups:
        g.update(copy.deepcopy(saved.get(g["tensor_fqn"], {})))
    sp.state.update(copy.deepcopy(state_dict["state"]))


class BlockPruner(BaseSparsifier):
    """Monotone magnitude pruning of r×c blocks (WP when ``sparse_block_shape=(1, 1)``).

    Constructor arguments are the group defaults; a config entry may override any
    of them per tensor. At every :meth:`step` with ``enable_mask_update`` set (and
    the group's own ``enable_mask_update`` not ``False``), each group's mask is
    and-ed with a new one:

    * ``threshold is None`` (target mode, e.g. under ``CubicSL``/``LambdaSL``): the
      lowest-scoring kept blocks are pruned until the pruned *weights* (ragged edge
      blocks count for what they hold) are closest to ``sparsity_level · numel``.
      For evenly tiled weights that is ``round(sparsity_level · blocks)`` blocks,
      as in ``WeightNormSparsifier`` (whose ``norm=2`` ranks like ``rms``, ``norm=1``
      like ``mean``) — but a block pruned earlier is never revived.
    * ``threshold = ε``: blocks scoring below ε are pruned, capped at ``sparsity_level``.

    ``self.state[fqn]`` holds ``mask`` (bool, weight-shaped), ``block_mask`` and
    ``history`` — ``(itr, threshold, sparsity)`` at every update — for reports.
    """

    def __init__(
        self,
        sparsity_level: float = 0.9,
        sparse_block_shape: tuple[int, int] = (1, 1),
        reduction: Reduction = "max",
        threshold: float | None = None,
    ) -> None:
        _check(sparsity_level, sparse_block_shape, reduction)
        super().__init__(
            defaults={
                "sparsity_level": sparsity_level,
                "sparse_block_shape": tuple(sparse_block_shape),
                "reduction": reduction,
                "threshold": threshold,
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
            g["sparse_block_shape"] = tuple(g["sparse_block_shape"])
            _check(g["sparsity_level"], g["sparse_block_shape"], g["reduction"], g["tensor_fqn"])
            r, c = g["sparse_block_shape"]
            st = self.state[g["tensor_fqn"]]
            st["block_mask"] = torch.ones(math.ceil(w.shape[0] / r), math.ceil(w.shape[1] / c), dtype=torch.bool,
                                          device=w.device)
            st["mask"] = torch.ones_like(w, dtype=torch.bool)
            st["history"] = []

    def step(self, use_path: bool = True) -> None:  # noqa: ARG002 - BaseSparsifier signature
        """One training iteration: update masks if enabled, then re-apply all masks.

        A no-op after :meth:`squash_mask`.
        """
        if self.squashed:
            return
        self.itr += 1
        if self.enable_mask_update:
            with torch.no_grad():
                for g in self.groups:
                    if g.get("enable_mask_update", True):
                        self.update_mask(**g)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights in place (keeps RNN flat weights intact)."""
        for g in self.groups:
            getattr(g["module"], g["tensor_name"]).mul_(self.state[g["tensor_fqn"]]["mask"])

    def scores(self, group: dict[str, Any]) -> torch.Tensor:
        """Block scores of a group's weight as masked now (pruned blocks score 0)."""
        w = getattr(group["module"], group["tensor_name"]) * self.state[group["tensor_fqn"]]["mask"]
        return block_scores(w, group["sparse_block_shape"], group["reduction"])

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        tensor_fqn: str,
        threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        st = self.state[tensor_fqn]
        kept = st["block_mask"]
        sizes = tile(torch.ones_like(st["mask"], dtype=torch.float), sparse_block_shape).sum((-1, -2))
        n_target = min(max(sparsity_level, 0.0), 1.0) * float(sizes.sum())  # in weights: edge blocks are smaller
        n_pruned = float(sizes[~kept].sum())
        if threshold is None and n_pruned >= n_target - float(sizes.min()) / 2:
            keep = kept  # already at (or, never reviving, past) the target: nothing to score
        else:
            scores = self.scores({"module": module, "tensor_name": tensor_name, "tensor_fqn": tensor_fqn,
                                  "sparse_block_shape": sparse_block_shape, **kwargs})
            keep = kept if threshold is None else kept & (scores >= threshold)
            if threshold is None or float(sizes[~keep].sum()) > n_target:
                keep = _prune_to(scores, kept, sizes, n_target)
        if keep is not kept or threshold is not None:  # history: every threshold update, every change
            st["block_mask"] = keep
            st["mask"] = expand_blocks(keep, sparse_block_shape, st["mask"].shape)
            st["history"].append((self.itr, threshold, float((~st["mask"]).float().mean())))

    def state_dict(self) -> dict[str, Any]:
        """Masks, histories, group keys (thresholds included), the iteration count and update flag."""
        return {**super().state_dict(), "itr": self.itr, "squashed": self.squashed,
                "enable_mask_update": self.enable_mask_update}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore into a sparsifier already ``prepare``-d on the same model (no parametrizations)."""
        restore_groups(self, state_dict, strict)
        self.itr = state_dict["itr"]
        self.squashed = state_dict.get("squashed", False)
        self.enable_mask_update = state_dict.get("enable_mask_update", True)
        self.apply_masks()

    def squash_mask(
        self,
        params_to_keep: tuple[str, ...] | None = None,
        params_to_keep_per_layer: dict[str, tuple[str, ...]] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Leave exact zeros in the weights and stop masking; masks stay in ``state``.

        As in ``torch.ao``: group keys named in ``params_to_keep`` (all groups) and
        ``params_to_keep_per_layer[module_fqn]`` are stored in ``module.sparse_params``.
        A module with several pruned tensors (an RNN's ``weight_ih_l0``,
        ``weight_hh_l0``, ...) gets one such dict per tensor name instead, where
        ``torch.ao`` would let the last tensor overwrite the others.
        """
        self.apply_masks()
        self.squashed = True
        per_module: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for g in self.groups:
            keys = tuple(params_to_keep or ()) + tuple((params_to_keep_per_layer or {}).get(g["module_fqn"], ()))
            if keys:
                missing = [k for k in keys if k not in g]
                if missing:
                    raise KeyError(f"{g['tensor_fqn']}: no sparsity parameter {missing} (has {sorted(g)})")
                per_module.setdefault(id(g["module"]), []).append((g["tensor_name"], {k: g[k] for k in keys}))
        for g in self.groups:
            entries = per_module.pop(id(g["module"]), None)
            if entries:
                g["module"].sparse_params = entries[0][1] if len(entries) == 1 else dict(entries)

    def convert(  # type: ignore[override]
        self,
        module: nn.Module,
        mapping: dict[type[nn.Module], type[nn.Module]] | None = None,
        inplace: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        """Swap every pruned submodule whose type is in ``mapping`` for ``mapping[type].from_dense(mod)``.

        ``torch.ao``'s version looks for its mask parametrizations, which this
        sparsifier does not use, so it would silently swap nothing; this one finds
        the pruned modules from the groups, applies the masks first, and raises if
        ``mapping`` is missing or matches no pruned module.
        """
        if mapping is None:
            raise NotImplementedError("convert needs a mapping {dense module type: sparse type with from_dense}")
        self.apply_masks()
        pruned = {g["module_fqn"] for g in self.groups if type(g["module"]) in mapping}
        if not pruned:
            types = sorted({type(g["module"]).__name__ for g in self.groups})
            raise ValueError(f"no pruned module has a type in mapping (pruned types: {types})")
        if not inplace:
            module = copy.deepcopy(module)
        for fqn in sorted(pruned, key=len, reverse=True):
            parent_name, _, child = fqn.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if not fqn:
                raise ValueError("cannot convert the root module itself; wrap it in a container")
            setattr(parent, child, swap_module(parent.get_submodule(child), mapping))
        return module

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


def _check(sparsity_level: float, block: tuple[int, int], reduction: str, where: str = "BlockPruner") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction {reduction!r}; choose from {REDUCTIONS}")
    if not 0.0 <= sparsity_level <= 1.0:
        raise ValueError(f"{where}: sparsity_level must be in [0, 1], got {sparsity_level}")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"{where}: sparse_block_shape must be two positive ints, got {block}")


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


def prune_once(
    model: nn.Module,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (4, 4),
    reduction: Reduction = "max",
    config: list[dict[str, Any]] | None = None,
) -> BlockPruner:
    """One-shot magnitude pruning to ``sparsity_level`` (no training), squashed.

    For benchmark models with random weights, where a schedule has nothing to act on.
    """
    pruner = BlockPruner(sparsity_level, sparse_block_shape, reduction)
    pruner.prepare(model, config)
    pruner.step()
    pruner.squash_mask()
    return pruner
