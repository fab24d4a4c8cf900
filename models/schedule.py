"""The gradual pruning threshold schedule of Narang et al. 2017 (arXiv:1704.05119).

The threshold ε grows with slope θ from ``start_itr`` to ``ramp_itr`` and with
slope φ (1.5θ by default) from ``ramp_itr`` to ``end_itr``; it is only applied
every ``freq`` iterations. A weight (or block) below ε is masked for good.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


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


def score_quantile(scores: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a score tensor (torch.quantile has an input-size limit)."""
    return float(np.quantile(scores.detach().flatten().double().cpu().numpy(), q))
