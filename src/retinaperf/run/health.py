"""Divergence is never silent: consecutive steps whose loss is not finite, watched on the device,
and the stop when there are too many.

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
        total = sum(losses.values())
        assert isinstance(total, torch.Tensor)  # not the 0 of an empty sum: there are losses
        finite = torch.isfinite(total)
        self.streak = (self.streak + 1) * ~finite
        self.longest = torch.maximum(self.longest, self.streak)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"streak": self.streak.cpu(), "longest": self.longest.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.streak.copy_(state["streak"])
        self.longest.copy_(state["longest"])


def diverged(longest: int, limit: int) -> bool:
    """Whether the loss has not been finite for `limit` consecutive steps (`longest`, agreed by
    the ranks); a limit of 0 never stops."""
    return limit > 0 and longest >= limit


def divergence_message(
    longest: int, limit: int, step: int, parts: dict[str, float], lr: float, kept: str | None
) -> str:
    """Why the run stops as failed, naming the step, the loss parts, the lr and the last good
    checkpoint (`kept`; None: none was written), and what to do."""
    shown = ", ".join(f"{name} {value:.4g}" for name, value in parts.items())
    checkpoint = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"
    return (
        f"training diverged: the loss was not finite for {int(longest)} consecutive steps "
        f"(limit max_bad_steps={limit}); at step {step}: {shown}, lr {lr:g}; {checkpoint}: "
        "lower lr, raise clip_grad_norm's protection, or use another precision"
    )
