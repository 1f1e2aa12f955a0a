"""Divergence is never silent: consecutive steps whose loss is not finite, watched on the device.

Each step adds a few element-wise operations on the device (no host synchronisation); the loop
reads the result where it already waits for the device, at logged steps. The loss scaler's
skipped updates are counted by `Precision`.
"""

from __future__ import annotations

import torch


class LossWatch:
    """The current and the longest run of consecutive steps with a non-finite loss."""

    def __init__(self, device: torch.device) -> None:
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        finite = torch.isfinite(sum(losses.values()))
        self.streak = (self.streak + 1) * ~finite
        self.longest = torch.maximum(self.longest, self.streak)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"streak": self.streak.cpu(), "longest": self.longest.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.streak.copy_(state["streak"])
        self.longest.copy_(state["longest"])
