"""Advantage estimators: rewards -> per-token advantages ``[N, T]``.

    est = GroupBaseline(scale="group", std="unbiased")          # GRPO (DeepSeekMath eq. 3)
    adv = est(rewards, mask, group_size=4)                       # rewards [N], mask [N, T]

Rows are grouped contiguously: rows ``g*G .. g*G+G-1`` are the G completions of prompt g.
``valid`` ([N] bool, optional) marks samples whose reward is usable; invalid samples get a zero
advantage and are left out of group and batch statistics (TRL's treatment of NaN rewards).
``reduce_sum`` (optional) sums a tensor over all data-parallel ranks; it is used only for
batch-level statistics so that every rank computes the same normaliser.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .registry import ADVANTAGES, Component, as_float, check_range

ReduceFn = Optional[Callable[[Tensor], Tensor]]


class AdvantageEstimator(Component):
    """Base class. Subclasses implement ``__call__(rewards, mask, group_size, valid, reduce_sum)``.

    Extra inputs: an estimator lists the inputs it needs beyond the rewards in ``needs`` (a tuple
    of names; a class attribute or a property, empty by default), and the caller passes exactly
    those as keyword arguments:

    - ``"kl"``: ``kl`` ``[N, T]``, the per-token KL between the old policy (the one that sampled)
      and the reference, e.g. ``old_logp - ref_logp`` (k1), zero at padding; folded into the reward
      (REINFORCE++).
    - ``"reward_components"``: ``reward_components`` ``dict[str, Tensor [N]]``, each reward
      function's raw (unweighted) reward, and ``reward_weights`` ``dict[str, float]`` (a missing name
      weighs 1.0); multi-reward normalisation (GDPO).

    An estimator called without an input it lists warns once and falls back as its docstring says
    (so a preset still builds and runs where nothing passes it yet). Estimators with state across
    steps (running normalisation) expose ``state_dict()`` / ``load_state_dict()`` for checkpoints.
    Everything computed over the batch goes through ``reduce_sum`` so all ranks agree exactly.
    """

    requires_groups = False
    needs: tuple[str, ...] = ()

    def check_group_size(self, group_size: int | None) -> None:
        if self.requires_groups and (group_size is None or int(group_size) < 2):
            raise ValueError(
                f"group_size={group_size!r}: the {self.registered_name!r} advantage estimator "
                "compares completions of the same prompt and needs group_size >= 2"
            )

    def _prepare(self, rewards: Tensor, mask: Tensor, group_size: int | None,
                 valid: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask.dim() != 2:
            raise ValueError(f"mask must be [N, T], got shape {list(mask.shape)}")
        n = mask.shape[0]
        if rewards.shape[0] != n:
            raise ValueError(
                f"shape mismatch: rewards{list(rewards.shape)} vs mask{list(mask.shape)}: "
                "one reward per completion row is required"
            )
        self.check_group_size(group_size)
        if self.requires_groups and n % int(group_size) != 0:
            raise ValueError(
                f"group_size={group_size} does not divide the batch of {n} completions"
            )
        if valid is None:
            valid = torch.ones(n, dtype=torch.bool, device=mask.device)
        elif valid.shape != (n,):
            raise ValueError(f"valid must be [N]={n}, got shape {list(valid.shape)}")
        r = as_float(rewards)
        r = torch.where(valid.view(-1, *([1] * (rewards.dim() - 1))), r, torch.zeros((), dtype=r.dtype, device=r.device))
        return r, valid



def _group_stats(r: Tensor, v: Tensor, group_size: int, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, std and count over the valid members of each group, broadcast back to [N]."""
    rg = r.view(-1, group_size)  # [B, G]
    vg = v.view(-1, group_size).to(r.dtype)  # [B, G]
    cnt = vg.sum(-1, keepdim=True)  # [B, 1]
    mean = (rg * vg).sum(-1, keepdim=True) / cnt.clamp(min=1)  # [B, 1]
    dof = (cnt - 1) if unbiased else cnt
    var = (((rg - mean) * vg) ** 2).sum(-1, keepdim=True) / dof.clamp(min=1)  # [B, 1]
    shape = rg.shape
    return (mean.expand(shape).reshape(-1), var.sqrt().expand(shape).reshape(-1),
            cnt.expand(shape).reshape(-1))


def _group_tied(r: Tensor, v: Tensor, group_size: int) -> Tensor:
    """[N] bool: the valid rewards of the row's group are all equal (exactly). Such a group must
    get A = 0; its float mean need not equal the rewards exactly (3 x 0.1), so test it directly."""
    rg, vg = r.view(-1, group_size), v.view(-1, group_size)  # [B, G]
    hi = torch.where(vg, rg, torch.full_like(rg, -float("inf"))).amax(-1, keepdim=True)  # [B, 1]
    lo = torch.where(vg, rg, torch.full_like(rg, float("inf"))).amin(-1, keepdim=True)  # [B, 1]
    return (hi <= lo).expand(rg.shape).reshape(-1)


@ADVANTAGES.register("group_baseline")
class GroupBaseline(AdvantageEstimator):
    """Group-relative advantage ``A_i = (R_i - mean_g R) / (std + eps)`` on every token of i.

    GRPO: DeepSeekMath (arXiv 2402.03300) eq. 3, outcome supervision.
    ``scale``: ``"group"`` (std of the group, GRPO), ``"batch"`` (std of all rewards in the
    batch, TRL ``scale_rewards="batch"``) or ``"none"`` (Dr. GRPO, arXiv 2503.20783).
    ``std``: ``"unbiased"`` (N-1, as verl and TRL) or ``"population"``.
    ``leave_one_out``: baseline is the mean of the *other* G-1 rewards (RLOO, arXiv 2402.14740),
    which equals ``G/(G-1) * (R_i - mean_g R)``.
    A group whose (valid) rewards are all equal gets A = 0, also with ``eps=0``.
    """

    requires_groups = True

    def __init__(self, scale: str = "group", std: str = "unbiased", eps: float = 1e-6,
                 leave_one_out: bool = False) -> None:
        if scale not in ("group", "batch", "none"):
            raise ValueError(f"scale={scale!r} is not valid; valid choices: batch, group, none")
        if std not in ("unbiased", "population"):
            raise ValueError(f"std={std!r} is not valid; valid choices: population, unbiased")
        self.scale = scale
        self.std = std
        self.eps = check_range("eps", eps, low=0.0)
        self.leave_one_out = bool(leave_one_out)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        if r.dim() != 1:
            raise ValueError("group_baseline takes one scalar reward per completion: rewards [N]")
        unbiased = self.std == "unbiased"
        mean, gstd, cnt = _group_stats(r, v, int(group_size), unbiased)  # [N] each
        centred = r - mean  # [N]
        if self.leave_one_out:
            centred = centred * cnt / (cnt - 1).clamp(min=1)
        if self.scale == "group":
            centred = centred / (gstd + self.eps)
        elif self.scale == "batch":
            vf = v.to(r.dtype)
            stats = torch.stack([(r * vf).sum(), (r * r * vf).sum(), vf.sum()])  # [3]
            if reduce_sum is not None:
                stats = reduce_sum(stats)
            s, s2, n = stats.unbind()
            bmean = s / n.clamp(min=1)
            dof = (n - 1) if unbiased else n
            bvar = ((s2 - n * bmean * bmean) / dof.clamp(min=1)).clamp(min=0)
            centred = centred / (bvar.sqrt() + self.eps)
        keep = v & ~_group_tied(r, v, int(group_size))  # tied groups: A = 0, not 0/0 = NaN when eps=0
        adv = torch.where(keep, centred, torch.zeros_like(centred))  # [N]
        return adv[:, None] * mask.to(adv.dtype)  # [N, T]


@ADVANTAGES.register("group_contrast")
class GroupContrast(AdvantageEstimator):
    """The seed's GSPO contrast: ``+1/|good|`` above the group mean, ``-1/|bad|`` below, 0 at it.

    With these weights ``sum_i A_i * s_i * g_i = mean_good(s*g) - mean_bad(s*g)``: the seed's
    step 4. A reward within ``atol`` of the group mean counts as "at the mean".
    """

    requires_groups = True

    def __init__(self, atol: float = 1e-6) -> None:
        self.atol = check_range("atol", atol, low=0.0)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        mean, _, _ = _group_stats(r, v, int(group_size), unbiased=False)  # [N]
        v = v & ~_group_tied(r, v, int(group_size))  # all equal: no good, no bad (float mean may be off by an ulp)
        good = (r > mean + self.atol) & v  # [N]
        bad = (r < mean - self.atol) & v  # [N]
        n_good = good.view(-1, int(group_size)).sum(-1, keepdim=True).expand(-1, int(group_size)).reshape(-1)
        n_bad = bad.view(-1, int(group_size)).sum(-1, keepdim=True).expand(-1, int(group_size)).reshape(-1)
        adv = good.to(r.dtype) / n_good.clamp(min=1) - bad.to(r.dtype) / n_bad.clamp(min=1)  # [N]
        return adv[:, None] * mask.to(adv.dtype)  # [N, T]


@ADVANTAGES.register("discounted_return")
class DiscountedReturn(AdvantageEstimator):
    """Discounted return ``G_t = sum_{k>=t} gamma^(k-t) r_k`` over completion tokens (the seed's GRPO).

    ``rewards`` is either ``[N]`` (a terminal reward, placed on the last unmasked token, so
    ``G_t = gamma^(L-t) R``) or ``[N, T]`` per-token rewards. No baseline is subtracted unless
    ``whiten=True``, which standardises the returns over all valid tokens of the batch
    (REINFORCE++-style). Needs no groups.
    """

    def __init__(self, gamma: float = 1.0, whiten: bool = False, eps: float = 1e-6) -> None:
        self.gamma = check_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
        self.whiten = bool(whiten)
        self.eps = check_range("eps", eps, low=0.0)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)
        m = mask.to(r.dtype)  # [N, T]
        if r.dim() == 1:
            t = mask.shape[1]
            pos = torch.arange(t, device=mask.device).expand_as(m)  # [N, T]
            last = torch.where(mask.bool(), pos, -1).max(-1).values  # [N]; -1 when empty
            per_tok = torch.zeros_like(m)  # [N, T]
            rows = torch.nonzero(last >= 0).squeeze(-1)
            per_tok[rows, last[rows]] = r[rows]
        elif r.shape == mask.shape:
            per_tok = r * m  # [N, T]
        else:
            raise ValueError(f"shape mismatch: rewards{list(r.shape)} must be [N] or [N, T] like mask{list(mask.shape)}")
        ret = torch.zeros_like(per_tok)  # [N, T]
        running = torch.zeros_like(per_tok[:, 0])  # [N]
        for t in range(per_tok.shape[1] - 1, -1, -1):
            running = (per_tok[:, t] + self.gamma * running) * m[:, t]
            ret[:, t] = running
        vm = m * v[:, None].to(r.dtype)  # [N, T]
        if self.whiten:
            stats = torch.stack([(ret * vm).sum(), (ret * ret * vm).sum(), vm.sum()])
            if reduce_sum is not None:
                stats = reduce_sum(stats)
            s, s2, n = stats.unbind()
            mu = s / n.clamp(min=1)
            var = ((s2 - n * mu * mu) / (n - 1).clamp(min=1)).clamp(min=0)
            ret = (ret - mu) / (var.sqrt() + self.eps)
        return ret * vm  # [N, T]


# --- 2025-26 methods ---------------------------------------------------------------------------
