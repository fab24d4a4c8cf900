"""The gradual pruning threshold schedule of Narang et al. 2017 (arXiv:1704.05119).

The threshold ε grows with slope θ from ``start_itr`` to ``ramp_itr`` and with
slope φ (1.5θ by default) from ``ramp_itr`` to ``end_itr``; it is only applied
every ``freq`` iterations. A weight (or block) below ε is masked for good.
:class:`PruneSchedule` is the arithmetic; :class:`NarangSL` drives a
:class:`~.sparsifier.BlockPruner` with it as a ``torch.ao.pruning`` scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from torch.ao.pruning.scheduler.base_scheduler import BaseScheduler

from .sparsifier import BlockPruner, score_quantile


@dataclass
class PruneSchedule:
    """Hyper-parameters of one threshold schedule (one per weight kind in the paper).

    ``theta`` may be left ``None`` and set later by :meth:`with_theta_for` from the
    scores of the layer, as the paper does with the 90th percentile of |w|.
    ``phi`` defaults to 1.5·θ.
    """

    start_itr: int
    ramp_itr: int
    end_itr: int
    freq: int = 1
    theta: float | None = None
    phi: float | None = field(default=None)

    def __post_init__(self) -> None:
        if not (0 <= self.start_itr <= self.ramp_itr <= self.end_itr):
            raise ValueError(f"need 0 <= start_itr <= ramp_itr <= end_itr, got {self}")
        if self.freq < 1:
            raise ValueError("freq must be >= 1")
        if self.theta is not None and self.phi is None:
            self.phi = 1.5 * self.theta

    def theta_for_final_threshold(self, q: float) -> float:
        """θ such that the threshold reached at ``end_itr`` is ``q`` (with φ = 1.5θ).

        The paper's rule θ = 2·q·freq / (2·(ramp−start) + 3·(end−ramp)), with q the
        90th percentile of |w| at the start of pruning.
        """
        denom = 2 * (self.ramp_itr - self.start_itr) + 3 * (self.end_itr - self.ramp_itr)
        if denom <= 0:
            raise ValueError("end_itr must be after start_itr to derive theta")
        return 2.0 * q * self.freq / denom

    def with_theta_for(self, q: float) -> "PruneSchedule":
        """A copy with θ (and φ = 1.5θ) derived from the final threshold ``q``."""
        theta = self.theta_for_final_threshold(q)
        return PruneSchedule(self.start_itr, self.ramp_itr, self.end_itr, self.freq, theta, 1.5 * theta)

    def threshold(self, itr: int) -> float:
        """ε at iteration ``itr``: 0 before start, Algorithm 1 of the paper in between.

        start < itr < ramp:   ε = θ·(itr − start + 1)/freq
        ramp ≤ itr < end:     ε = (θ·(ramp − start + 1) + φ·(itr − ramp + 1))/freq
        itr ≥ end:            the value at end − 1 (no further growth).
        """
        if self.theta is None:
            raise ValueError("theta is not set; call with_theta_for(q) first")
        phi = self.phi if self.phi is not None else 1.5 * self.theta
        if itr <= self.start_itr:
            return 0.0
        itr = min(itr, self.end_itr - 1)
        if itr < self.ramp_itr:
            return self.theta * (itr - self.start_itr + 1) / self.freq
        return (self.theta * (self.ramp_itr - self.start_itr + 1) + phi * (itr - self.ramp_itr + 1)) / self.freq

    def is_update_itr(self, itr: int) -> bool:
        """Masks are updated every ``freq`` iterations in (start, end], and at end."""
        return self.start_itr < itr <= self.end_itr and ((itr - self.start_itr) % self.freq == 0 or itr == self.end_itr)


class NarangSL(BaseScheduler):
    """Narang et al.'s threshold schedule as a ``torch.ao.pruning`` scheduler for :class:`BlockPruner`.

    Call order as in ``torch.ao``: ``optimizer.step(); sparsifier.step(); scheduler.step()``.
    After ``k`` scheduler steps (``last_epoch = k``) the groups hold the settings for
    sparsifier step ``k + 1`` (iteration ``itr = k + 1``): the group's
    ``enable_mask_update`` is on only at :meth:`PruneSchedule.is_update_itr`
    iterations, and ``threshold`` is ε(itr). Every argument may be a list, one per
    group (e.g. other hyper-parameters for recurrent weights, as in the paper).

    * ``percentile=None`` (target mode): each group's ``sparsity_level`` is the
      target. θ is re-derived at every update from the ``sparsity_level`` quantile
      of the *current* block scores (weights grow while training, so a θ fixed at
      the start undershoots), ε never decreases, the sparsifier never prunes past
      the target, and at ``end_itr`` the threshold is dropped so the last update
      prunes to the target exactly.
    * ``percentile=p`` (paper mode): θ comes once from the ``p`` quantile (0.9 in the
      paper) of the scores at the first update, unless ``theta`` is given; the
      threshold alone decides and ``sparsity_level`` is only a ceiling (use 1.0).
    """

    def __init__(
        self,
        sparsifier: BlockPruner,
        start_itr: int | list[int],
        ramp_itr: int | list[int],
        end_itr: int | list[int],
        freq: int | list[int] = 1,
        theta: float | None | list[float | None] = None,
        phi: float | None | list[float | None] = None,
        percentile: float | None | list[float | None] = None,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        if not isinstance(sparsifier, BlockPruner):
            raise TypeError(f"NarangSL drives a BlockPruner (it sets its thresholds), got {type(sparsifier).__name__}")
        self.sparsifier = sparsifier
        args = [self._make_sure_a_list(a) for a in (start_itr, ramp_itr, end_itr, freq, theta, phi)]
        self.schedules = [PruneSchedule(*a) for a in zip(*args)]
        self.percentile = self._make_sure_a_list(percentile)
        self.eps = [0.0] * len(self.schedules)
        super().__init__(sparsifier, last_epoch, verbose)

    def get_sl(self) -> list[float]:
        """``sparsity_level`` stays as given: the target (target mode) or a ceiling (paper mode)."""
        return list(self.base_sl)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        itr = self.last_epoch + 1  # the sparsifier step these settings are for
        any_update = False
        for i, g in enumerate(self.sparsifier.groups):
            s = self.schedules[i]
            g["enable_mask_update"] = s.is_update_itr(itr)
            if not g["enable_mask_update"]:
                continue
            any_update = True
            if self.percentile[i] is None:  # target mode
                if itr >= s.end_itr:
                    g["threshold"] = None
                    continue
                s = self.schedules[i] = s.with_theta_for(score_quantile(self.sparsifier.scores(g), self.base_sl[i]))
            elif s.theta is None:
                s = self.schedules[i] = s.with_theta_for(score_quantile(self.sparsifier.scores(g), self.percentile[i]))
            self.eps[i] = max(self.eps[i], s.threshold(itr))
            g["threshold"] = self.eps[i]
        self.sparsifier.enable_mask_update = any_update
