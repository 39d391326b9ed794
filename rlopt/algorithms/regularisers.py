"""Regularisers around the policy loss, pure parts only (no Lightning): an adaptive entropy
coefficient and reference-policy mixing.

    ctrl = AdaptiveEntropyCoef(coef=0.0, target=0.2, delta=0.005)
    coef = ctrl.step(mean_token_entropy)        # after each rollout step: the coefficient for the next
    mix_reference_(ref.parameters(), policy.parameters(), alpha=0.6)   # every k steps (TRL sync_ref_model)

The training module owns the wiring: when to call ``step`` (once per rollout step, with the
token-mean entropy over the whole batch and all ranks) and when to mix the reference.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .registry import check_range


class AdaptiveEntropyCoef:
    """Adaptive entropy-bonus coefficient (Skywork-OR1, arXiv 2505.22312, "adaptive entropy control").

    After each step with mean token entropy ``e`` the coefficient ``c`` moves by ``delta`` toward
    keeping the entropy at ``target``: ``c <- min(c + delta, max)`` if ``e <= target``, else
    ``c <- max(c - delta, min)``. ``step(e)`` returns the coefficient to use for the next update:
    with ``gate`` (the paper as we read it) ``c * [e <= target]``, i.e. no bonus at all while the
    entropy is above the target; without it (TRL ``use_adaptive_entropy``) ``c`` itself.

    Defaults are TRL's (``entropy_coef`` 0.0 initial, ``entropy_coef_min`` 0.0, ``_max`` 1.0,
    ``_delta`` 0.005, ``entropy_target`` 0.2 nats); the loss is ``loss - coef * agg(entropy)``.
    ``state_dict()`` / ``load_state_dict()`` keep ``c`` (and the last entropy) in a checkpoint.
    """

    def __init__(self, coef: float = 0.0, target: float = 0.2, delta: float = 0.005,
                 min: float = 0.0, max: float = 1.0, gate: bool = True) -> None:  # noqa: A002 - config keys
        self.min = check_range("min", min, low=0.0)
        self.max = check_range("max", max, low=self.min)
        self.coef = check_range("coef", coef, low=self.min, high=self.max)
        self.target = check_range("target", target, low=0.0)
        self.delta = check_range("delta", delta, low=0.0)
        self.gate = bool(gate)
        self.last_entropy: float | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "AdaptiveEntropyCoef":
        """From the ``entropy`` config group (``configs/entropy/adaptive.yaml``): ``adaptive`` is dropped."""
        params = {k: v for k, v in dict(cfg).items() if k != "adaptive"}
        return cls(**params)

    @property
    def value(self) -> float:
        """The coefficient to apply now (before any ``step``: the initial ``coef``)."""
        if self.gate and self.last_entropy is not None and self.last_entropy > self.target:
            return 0.0
        return self.coef

    def step(self, entropy: float | Tensor) -> float:
        """Record this step's mean token entropy, move ``coef`` and return the coefficient for the next update."""
        e = float(entropy)
        if e != e:
            raise ValueError("entropy is NaN: the adaptive entropy coefficient needs a finite mean entropy")
        if e <= self.target:
            self.coef = self.max if self.coef + self.delta > self.max else self.coef + self.delta
        else:
            self.coef = self.min if self.coef - self.delta < self.min else self.coef - self.delta
        self.last_entropy = e
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "coef" not in state:
            raise ValueError("adaptive entropy state_dict is missing 'coef'")
        self.coef = check_range("coef", state["coef"], low=self.min, high=self.max)
        last = state.get("last_entropy")
        self.last_entropy = None if last is None else float(last)

    def __repr__(self) -> str:
        return (f"AdaptiveEntropyCoef(coef={self.coef}, target={self.target}, delta={self.delta}, "
                f"min={self.min}, max={self.max}, gate={self.gate})")


@torch.no_grad()
def mix_reference_(ref_params: Iterable[Tensor], policy_params: Iterable[Tensor], alpha: float) -> None:
    """Move the reference toward the policy in place: ``ref = alpha * policy + (1 - alpha) * ref``.

    TRL ``sync_ref_model`` (``ref_model_mixup_alpha`` 0.6, every ``ref_model_sync_steps`` 512 steps;
    TR-DPO, arXiv 2404.09656). ``alpha = 1`` copies the policy. The parameters are paired in order
    and must have equal shapes (under FSDP: the same local shards); no gradient is recorded.
    """
    a = check_range("alpha", alpha, low=0.0, high=1.0)
    refs, pols = list(ref_params), list(policy_params)
    if len(refs) != len(pols):
        raise ValueError(f"mix_reference_: {len(refs)} reference parameters but {len(pols)} policy parameters")
    for i, (r, p) in enumerate(zip(refs, pols)):
        if r.shape != p.shape:
            raise ValueError(f"mix_reference_: parameter {i} has shape {list(r.shape)} in the reference "
                             f"and {list(p.shape)} in the policy")
        r.mul_(1.0 - a).add_(p.detach().to(device=r.device, dtype=r.dtype), alpha=a)
