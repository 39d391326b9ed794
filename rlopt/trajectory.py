"""The typed record of one rollout step: everything the update phase reads.

    traj = module.collect(batch)          # generate -> score -> advantages -> old / ref log-probs
    module.update(traj)                   # ppo_epochs x minibatches of optimizer updates
    traj.completions.completion_ids       # [N, T]
    traj.advantages                       # [N, T]

Rows are ``N = B x G`` completions, the G samples of a prompt contiguous. Per-token fields are
``[N, T]`` aligned with ``completions.completion_ids``; padding positions hold 0 and are
excluded by ``loss_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .rollout.base import Completions


@dataclass
class Trajectory:
    prompts: list[str]  # [B] prompt texts of this rank
    columns: dict[str, list[Any]]  # [B] per-prompt data columns (answers, ...) for rewards and accuracy
    completions: Completions  # ids and masks: prompt [N, P], completion [N, T], truncated [N]
    texts: list[str]  # [N] decoded completions
    rewards: Tensor  # [N] weighted total reward
    reward_components: dict[str, Tensor]  # {reward fn: [N]} before weighting
    valid: Tensor  # [N] bool: every reward function gave a finite value
    loss_mask: Tensor  # [N, T] float: tokens that enter the loss (completion mask x token masks)
    advantages: Tensor  # [N, T]
    old_logp: Tensor | None  # [N, T] pi_old; None when exactly on-policy (equal to the update's own log-probs)
    ref_logp: Tensor | None  # [N, T] reference policy; None without a KL term
    sampler_logp: Tensor | None = None  # [N, T] the behaviour policy mu that drew the tokens, when the engine reports it
    behaviour_weight: Tensor | None = None  # [N, T] detached behaviour-correction x token-mask weight; None = 1
    rollout_metrics: dict[str, Tensor] = field(default_factory=dict)  # correction/*, mask/* and mismatch/* of this step
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    policy_version: int = 0  # optimizer updates applied to the weights that sampled this batch
    staleness: int = 0  # updates between those weights and the policy being trained

    @property
    def num_rows(self) -> int:
        return int(self.loss_mask.shape[0])

    def token_count(self) -> Tensor:
        return self.loss_mask.sum()  # [] tokens in the loss

    def completion_lengths(self) -> Tensor:
        return self.completions.completion_mask.sum(-1).float()  # [N]
