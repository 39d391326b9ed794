"""One optimizer update, guarded: the gradient norm clipped over all ranks, the update skipped
(weights and optimizer state untouched) when any rank's loss or gradient is non-finite, and the
run stopped after too many skips in a row.

    guard = UpdateGuard(max_grad_norm=1.0, max_consecutive_skips=5)
    norm, applied = guard.step(optimizer, policy, device, rollout_step)   # after the backward passes
    guard.skipped                                                         # skips so far (checkpointed)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .distributed import clip_grad_norm_all_finite


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient."""


class UpdateGuard:
    def __init__(self, max_grad_norm: float | None = 1.0, max_consecutive_skips: int = 5) -> None:
        self.max_norm = float("inf") if max_grad_norm is None else float(max_grad_norm)  # None: no clipping
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped = 0  # non-finite updates skipped so far
        self.consecutive = 0

    def step(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, device: Any, rollout_step: int
             ) -> tuple[Tensor, bool]:
        """Clip, then apply the update unless the gradient is non-finite on some rank (the same
        decision on every rank). Returns the total norm (before clipping) and whether it was applied."""
        norm, finite = clip_grad_norm_all_finite(model, self.max_norm, device=device)
        if finite:
            optimizer.step()
            self.consecutive = 0
            return norm, True
        optimizer.zero_grad(set_to_none=True)
        self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive} consecutive updates had a non-finite loss or gradient "
                f"(at rollout step {rollout_step}); the weights were left untouched. Lower the learning "
                "rate or check the rewards; resume from the last checkpoint (max_consecutive_skips sets the limit)")
        return norm, False

    def state_dict(self) -> dict:
        return {"skipped_updates": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped_updates", 0))
