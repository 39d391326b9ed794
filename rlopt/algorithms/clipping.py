"""Clipping strategies: ``(ratio, advantages, log_ratio) -> (per-token loss, flags)``.

    loss_tok, flags = PPOClip(eps_low=0.2, eps_high=0.28)(ratio, adv, log_ratio)   # DAPO

All tensors are ``[N, T]``. The per-token loss is *minimised* (loss = -objective).
``flags`` holds boolean ``[N, T]`` tensors:

- ``low``: ``ratio < 1-eps_low`` and ``A < 0``; ``high``: ``ratio > 1+eps_high`` and ``A > 0``.
  These are the tokens whose gradient the clip sets to zero (TRL's definition);
  ``region`` is their union.
- ``cap``: ``A < 0`` and the ratio is above the dual-clip constant ``c`` or above ``delta``:
  the other place where a clip zeroes the gradient.
- ``outside``: the ratio lies outside ``[1-eps_low, 1+eps_high]`` whatever the sign of A (for
  the weight clip this is how often the weight was truncated; its gradient is never zeroed).
"""

from __future__ import annotations


import torch
from torch import Tensor

from .registry import CLIPPING, Component, check_range

#: The flags every clipping strategy returns (the contract above), in display order.
CLIP_FLAGS = ("low", "high", "region", "cap", "outside")
#: The flags where a clip zeroes the gradient (the main clip-fraction charts and report columns).
CLIP_MAIN_FLAGS = ("low", "high", "region")


class ClipStrategy(Component):
    """Base class for clipping strategies: ``__call__(ratio, adv, log_ratio) -> (loss_tok, flags)``.

    ``loss_tok`` ``[N, T]`` is minimised; ``flags`` maps every name of ``CLIP_FLAGS`` to a bool
    ``[N, T]`` tensor with the meaning given in this module's docstring (all-False where a flag
    does not apply). ``PolicyObjective`` turns them into ``clip/token_*`` and ``clip/seq_*``.

    Extra inputs: a strategy whose class attribute ``needs_logp`` is True is called as
    ``clip(ratio, adv, log_ratio, logp=..., old_logp=..., mask=...)``: the per-token log-probs of
    the policy being trained and of the old policy (``[N, T]``; ``old_logp`` is not sanitised at
    padding, so such a strategy zeroes padding itself) and the loss mask (``[N, T]`` float). The
    probability-space trust regions (DPPO), the sequence-product weight (VESPO) and the per-row
    geometric mean (GMPO) need them. Other strategies are called with the three tensors only.
    """

    needs_logp = False


    def _bounds(self) -> tuple[float, float]:
        lo = -float("inf") if getattr(self, "eps_low", None) is None else 1.0 - self.eps_low
        hi = float("inf") if getattr(self, "eps_high", None) is None else 1.0 + self.eps_high
        return lo, hi

    def _flags(self, ratio: Tensor, adv: Tensor, zero_grad_clip: bool) -> dict[str, Tensor]:
        lo, hi = self._bounds()
        below, above = ratio < lo, ratio > hi  # [N, T]
        none = torch.zeros_like(below)
        low = below & (adv < 0) if zero_grad_clip else none
        high = above & (adv > 0) if zero_grad_clip else none
        return {"low": low, "high": high, "region": low | high, "cap": none, "outside": below | above}


@CLIPPING.register("ppo")
class PPOClip(ClipStrategy):
    """PPO clipped objective ``-min(w*A, clip(w, 1-eps_low, 1+eps_high)*A)`` (Schulman et al. 2017).

    ``eps_high`` defaults to ``eps_low`` (symmetric). DAPO's clip-higher: 0.2 / 0.28
    (arXiv 2503.14476). GSPO with the sequence ratio: 3e-4 / 4e-4 (arXiv 2507.18071).
    ``dual_clip`` (c > 1): for A < 0 the loss is capped at ``-c*A`` (Ye et al. 2020, verl
    ``clip_ratio_c``). ``delta`` (> 1+eps_high): the unclipped ratio is capped at delta (TRL
    ``delta``, INTELLECT-2).
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float | None = None,
                 dual_clip: float | None = None, delta: float | None = None) -> None:
        self.eps_low = check_range("eps_low", eps_low, low=0.0, high=1.0, high_inclusive=False)
        self.eps_high = self.eps_low if eps_high is None else check_range("eps_high", eps_high, low=0.0)
        self.dual_clip = None if dual_clip is None else check_range("dual_clip", dual_clip, low=1.0, low_inclusive=False)
        self.delta = None
        if delta is not None:
            self.delta = check_range("delta", delta, low=1.0 + self.eps_high, low_inclusive=False)

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        lo, hi = self._bounds()
        w = ratio if self.delta is None else ratio.clamp(max=self.delta)  # [N, T]
        loss = torch.maximum(-adv * w, -adv * ratio.clamp(lo, hi))  # [N, T]
        flags = self._flags(ratio, adv, zero_grad_clip=True)
        caps = [c for c in (self.dual_clip, self.delta) if c is not None]
        if self.dual_clip is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * self.dual_clip), loss)
        if caps:
            flags["cap"] = (adv < 0) & (ratio > min(caps))
        return loss, flags


@CLIPPING.register("weight")
class WeightClip(ClipStrategy):
    """Clipped, stop-gradient importance weight: ``-sg(clip(w, 1-eps_low, 1+eps_high)) * A * log w``.

    Its gradient is ``sg(clip(w)) * A * grad logp``: every token keeps a gradient, scaled by the
    truncated weight. This is the seed's GRPO formula (eps 0.2, symmetric) and CISPO's
    (MiniMax-M1, arXiv 2506.13585), which drops the lower bound (``eps_low=None``).
    ``eps_high=None`` drops the upper bound.
    """

    def __init__(self, eps_low: float | None = 0.2, eps_high: float | None = 0.2) -> None:
        self.eps_low = None if eps_low is None else check_range("eps_low", eps_low, low=0.0, high=1.0, high_inclusive=False)
        self.eps_high = None if eps_high is None else check_range("eps_high", eps_high, low=0.0)

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        lo, hi = self._bounds()
        weight = ratio.detach().clamp(lo, hi)  # [N, T]
        return -weight * adv * log_ratio, self._flags(ratio, adv, zero_grad_clip=False)


@CLIPPING.register("none")
class NoClip(ClipStrategy):
    """No clipping: ``-w * A`` (importance-weighted REINFORCE)."""

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        none = torch.zeros_like(ratio, dtype=torch.bool)
        flags = {"low": none, "high": none, "region": none, "cap": none, "outside": none}
        return -adv * ratio, flags


# --- 2025-26 methods ---------------------------------------------------------------------------
