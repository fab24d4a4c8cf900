"""Gradual dynamic sparseness: the gated layers' ``keep`` lowered during training by a ``torch.ao`` scheduler.

The gated models of Hadifar et al. 2020 train at their final ``keep`` from the first step, while
the static pruners they are compared with (:class:`~.sparsifier.BlockPruner` under
:class:`~.schedule.NarangSL` or ``CubicSL``) start dense and prune gradually. This sparsifier gives
the gated model the same start: its "sparsity level" is the fraction of tiles the selection drops,
``1 - keep``, so ``torch.ao.pruning``'s ``CubicSL`` drives it from 0 (every tile kept) to
``1 - keep`` over a window, after which the model trains at its final ``keep``. No weight is masked:
every tile stays reachable (that is the method), so there is no mask to squash.

At ``keep = 1`` the cell divides each gate by the mean of all (signed) gate scores, which is near 0 at
the default initialisation: :meth:`DynamicKeepSparsifier.prepare` shifts the gate biases by
``gate_bias`` (default +1) so the scores start positive and ``r = g / mean(g)`` starts near 1.

Usage (``torch.ao`` order: optimizer, sparsifier, scheduler)::

    sp = DynamicKeepSparsifier()
    sp.prepare(model, None)  # every DynamicBlockLinear, at its current (final) keep
    sched = CubicSL(sp, init_sl=0.0, init_t=start, delta_t=1, total_t=end - start, initially_zero=True)
    for batch in data:
        loss.backward(); opt.step(); sp.step(); sched.step()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier

from .dynamic import DynamicBlockLinear
from .sparsifier import restore_groups


class DynamicKeepSparsifier(BaseSparsifier):
    """Sets each :class:`DynamicBlockLinear`'s ``keep`` to ``max(final_keep, 1 - sparsity_level)``.

    Group keys: ``sparsity_level`` (set by the scheduler; its target, ``base_sl``, is
    ``1 - final_keep``) and ``final_keep`` (the module's ``keep`` at :meth:`prepare`).
    ``state[fqn]["history"]``: ``(step, keep)`` whenever the number of kept tiles changes, for reports.
    """

    def __init__(self, gate_bias: float = 1.0) -> None:
        super().__init__(defaults={"gate_bias": gate_bias})
        self.itr = 0

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None) -> None:
        """``config``: ``[{"tensor_fqn": "<module>.weight"}, ...]`` of gated products, or None for all."""
        if config is None:
            config = [{"tensor_fqn": f"{n}.weight"} for n, m in model.named_modules()
                      if isinstance(m, DynamicBlockLinear)]
        if not config:
            raise ValueError("the model has no DynamicBlockLinear to schedule")
        super().prepare(model, config)

    def _prepare(self, *args: Any, **kwargs: Any) -> None:
        """No parametrization: record the final keep, start at keep 1 with positive gate scores."""
        for g in self.groups:
            m = g["module"]
            if not isinstance(m, DynamicBlockLinear):
                raise TypeError(f"{g['tensor_fqn']}: not a DynamicBlockLinear")
            g["final_keep"] = m.keep
            g["sparsity_level"] = 1.0 - m.keep  # the scheduler's target (base_sl)
            with torch.no_grad():
                m.gate.bias.add_(g["gate_bias"])
            self.state[g["tensor_fqn"]]["history"] = []
            self._set(g, 0.0)

    def _set(self, g: dict[str, Any], level: float) -> None:
        m, keep = g["module"], max(g["final_keep"], 1.0 - level)
        hist, k = self.state[g["tensor_fqn"]]["history"], m.k
        m.keep = keep
        if not hist or m.k != k:  # (a change of the kept count, not of every float step)
            hist.append((self.itr, keep))

    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any) -> None:
        g = next(g for g in self.groups if g["module"] is module)
        self._set(g, sparsity_level)

    def step(self, use_path: bool = True) -> None:
        self.itr += 1
        super().step(use_path)

    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to squash (no mask); the modules keep their final ``keep``."""
        for g in self.groups:
            self._set(g, 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Histories, group keys (levels included) and the step count."""
        return {**super().state_dict(), "itr": self.itr}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore into a sparsifier already ``prepare``-d on the same model and re-apply the levels
        (``keep`` is a module attribute, not a tensor of the model's state)."""
        restore_groups(self, state_dict, strict)
        self.itr = state_dict["itr"]
        for g in self.groups:
            hist = self.state[g["tensor_fqn"]]["history"]
            g["module"].keep = hist[-1][1] if hist else 1.0

    def sparsity(self) -> dict[str, float]:
        """Weight sparsity per tensor: 0 (the selection drops tiles per input, no weight is removed)."""
        return {g["tensor_fqn"]: 0.0 for g in self.groups}

    def overall_sparsity(self) -> float:
        return 0.0
