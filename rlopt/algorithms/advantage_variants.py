"""Advantage estimators of 2025-26 methods: batch whitening (REINFORCE++), GPG's scaling, OPO's
length-weighted baseline, pass@k credit, MaxRL, multi-reward GDPO and running / batch reward
normalisation. Same contract as advantages.py (``AdvantageEstimator``: extra inputs in ``needs``).

    est = ReinforcePP(kl_coef=0.01)
    adv = est(rewards, mask, group_size=4, kl=old_logp - ref_logp, reduce_sum=reduce_sum)   # [N, T]
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .advantages import AdvantageEstimator, GroupBaseline, ReduceFn, _group_stats, _group_tied
from .registry import ADVANTAGES, as_float, check_range


def _moments(x: Tensor, w: Tensor, reduce_sum: ReduceFn) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted count, mean and unbiased variance of ``x`` over the whole batch (all ranks):
    two passes (mean first), each one ``reduce_sum``, so every rank gets the same numbers."""
    first = torch.stack([(x * w).sum(), w.sum()])  # [2]
    if reduce_sum is not None:
        first = reduce_sum(first)
    s, n = first.unbind()
    mu = s / n.clamp(min=1)
    sq = ((x - mu) ** 2 * w).sum()  # 0-dim
    if reduce_sum is not None:
        sq = reduce_sum(sq)
    return n, mu, sq / (n - 1).clamp(min=1)


def _whiten(x: Tensor, w: Tensor, reduce_sum: ReduceFn, eps: float) -> Tensor:
    """``(x - mean) / (std + eps)`` with the weighted batch mean and unbiased std of ``x``."""
    _, mu, var = _moments(x, w, reduce_sum)
    return (x - mu) / (var.sqrt() + eps)


def _terminal(r: Tensor, m: Tensor) -> Tensor:
    """``[N]`` rewards placed on the last unmasked token of each row, ``[N, T]`` (0 for an empty row)."""
    pos = torch.arange(m.shape[1], device=m.device).expand(m.shape)  # [N, T]
    last = torch.where(m > 0, pos, -1).max(-1).values  # [N]; -1 when empty
    return (pos == last[:, None]).to(r.dtype) * r[:, None]  # [N, T]


def _returns(per_tok: Tensor, m: Tensor, gamma: float) -> Tensor:
    """``G_t = sum_{k>=t} gamma^(k-t) r_k`` within each row's masked tokens, ``[N, T]``."""
    ret = torch.zeros_like(per_tok)  # [N, T]
    running = torch.zeros_like(per_tok[:, 0])  # [N]
    for t in range(per_tok.shape[1] - 1, -1, -1):
        running = (per_tok[:, t] + gamma * running) * m[:, t]
        ret[:, t] = running
    return ret


def _group_view(x: Tensor, group_size: int) -> Tensor:
    return x.view(-1, int(group_size))  # [B, G]


class _WarnOnce:
    """A per-instance one-time warning for a missing extra input (see ``AdvantageEstimator``)."""

    def _warn_missing(self, what: str, fallback: str) -> None:
        if not getattr(self, "_warned", False):
            warnings.warn(f"{self.registered_name!r} advantage estimator: {what} was not passed; {fallback}. "
                          "The training module must pass it (see AdvantageEstimator).", RuntimeWarning, stacklevel=3)
            self._warned = True


@ADVANTAGES.register("reinforce_pp")
class ReinforcePP(AdvantageEstimator, _WarnOnce):
    """REINFORCE++ (arXiv 2501.03262): token rewards with the KL folded in, discounted returns,
    whitened over all tokens of the batch.

    ``r_t = R * [t = last] - kl_coef * kl_t``; ``G_t = sum_{k>=t} gamma^(k-t) r_k``;
    ``A_t = (G_t - mean) / (std + eps)`` with the mean and unbiased std over every valid token of
    the rollout batch on all ranks (token-weighted, re-centred). ``kl`` ``[N, T]`` is the per-token
    KL of the sampling (old) policy to the reference (verl/OpenRLHF use k1,
    ``old_logp - ref_logp``); it is needed only when ``kl_coef > 0`` (``needs``). Called without it,
    the estimator warns once and uses kl = 0. Needs no groups. ``kl_coef`` 0.01: OpenRLHF's
    REINFORCE++ examples (``init_kl_coef``); verl's ``kl_ctrl.kl_coef`` defaults to 0.001.
    """

    def __init__(self, kl_coef: float = 0.01, gamma: float = 1.0, eps: float = 1e-6) -> None:
        self.kl_coef = check_range("kl_coef", kl_coef, low=0.0)
        self.gamma = check_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
        self.eps = check_range("eps", eps, low=0.0)

    @property
    def needs(self) -> tuple[str, ...]:
        return ("kl",) if self.kl_coef > 0 else ()

    def _centre(self, r: Tensor, v: Tensor, group_size: int | None) -> Tensor:
        return r  # [N]

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None, kl: Tensor | None = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        if r.dim() != 1:
            raise ValueError(f"{self.registered_name} takes one scalar reward per completion: rewards [N]")
        m = mask.to(r.dtype)  # [N, T]
        per_tok = _terminal(self._centre(r, v, group_size), m)  # [N, T]
        if self.kl_coef > 0:
            if kl is None:
                self._warn_missing("kl (per-token KL of the old policy to the reference)", "using kl = 0")
            else:
                if kl.shape != mask.shape:
                    raise ValueError(f"shape mismatch: kl{list(kl.shape)} must be [N, T] like mask{list(mask.shape)}")
                per_tok = per_tok - self.kl_coef * torch.where(mask != 0, as_float(kl).detach(), 0.0).to(r.dtype)
        ret = _returns(per_tok, m, self.gamma)  # [N, T]
        vm = m * v[:, None].to(r.dtype)  # [N, T]
        return _whiten(ret, vm, reduce_sum, self.eps) * vm  # [N, T]


@ADVANTAGES.register("reinforce_pp_baseline")
class ReinforcePPBaseline(ReinforcePP):
    """REINFORCE++-baseline (arXiv 2501.03262): the group mean is removed from each reward, then as
    ``reinforce_pp`` (KL folded in if ``kl_coef > 0``, returns, token whitening over the batch).

    ``A = whiten_batch,token(R_i - mean_g R)``; a group whose rewards are all equal is centred to
    exactly 0 before whitening (whitening re-centres it, as verl and OpenRLHF do). ``kl_coef``
    defaults to 0: the paper and OpenRLHF pair the baseline variant with a KL *loss*
    (``kl: k3``) rather than a KL reward.
    """

    requires_groups = True

    def __init__(self, kl_coef: float = 0.0, gamma: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__(kl_coef=kl_coef, gamma=gamma, eps=eps)

    def _centre(self, r: Tensor, v: Tensor, group_size: int | None) -> Tensor:
        mean, _, _ = _group_stats(r, v, int(group_size), unbiased=False)  # [N]
        keep = v & ~_group_tied(r, v, int(group_size))
        return torch.where(keep, r - mean, torch.zeros_like(r))  # [N]


@ADVANTAGES.register("gpg")
class GPG(AdvantageEstimator):
    """GPG, Group Policy Gradient (arXiv 2504.02546): ``A_i = alpha * (R_i - mean_g R) / F``.

    ``alpha = B / B_eff`` rescales the batch for the samples that carry no gradient: ``B`` is the
    number of valid samples of the rollout batch (all ranks) and ``B_eff`` the number with a
    non-zero advantage (``count="advantage"``, the paper: groups whose rewards are all equal drop
    out). ``count="reward"`` counts non-zero *rewards* instead (verl's code). ``F`` is 1, or the
    group's unbiased std with ``std_normalize``. Pair it with ``clip: pg`` (``-A log pi``).
    """

    requires_groups = True

    def __init__(self, std_normalize: bool = False, count: str = "advantage", eps: float = 1e-6) -> None:
        if count not in ("advantage", "reward"):
            raise ValueError(f"count={count!r} is not valid; valid choices: advantage, reward")
        self.std_normalize = bool(std_normalize)
        self.count = count
        self.eps = check_range("eps", eps, low=0.0)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        g = int(group_size)
        mean, std, _ = _group_stats(r, v, g, unbiased=True)  # [N] each
        centred = r - mean  # [N]
        if self.std_normalize:
            centred = centred / (std + self.eps)
        keep = v & ~_group_tied(r, v, g)  # [N]
        adv = torch.where(keep, centred, torch.zeros_like(centred))  # [N]
        nonzero = (keep & (adv != 0)) if self.count == "advantage" else (v & (r != 0))  # [N]
        stats = torch.stack([v.to(r.dtype).sum(), nonzero.to(r.dtype).sum()])  # [2]
        if reduce_sum is not None:
            stats = reduce_sum(stats)
        alpha = stats[0] / stats[1].clamp(min=1)
        return (alpha * adv)[:, None] * mask.to(r.dtype)  # [N, T]


@ADVANTAGES.register("opo")
class OPO(AdvantageEstimator):
    """OPO, On-Policy RL with Optimal reward baseline (arXiv 2505.23585): the length-weighted
    baseline ``b_g = sum_{i in g} |y_i| R_i / sum_{i in g} |y_i|``, ``A_i = R_i - b_g`` (no std).

    ``|y_i|`` is the number of completion tokens (the mask's row sum); invalid samples are left
    out of the baseline; a group whose rewards are all equal gets A = 0.
    """

    requires_groups = True

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        g = int(group_size)
        m = mask.to(r.dtype)  # [N, T]
        lw = m.sum(-1) * v.to(r.dtype)  # [N] lengths of the valid samples
        num = _group_view(lw * r, g).sum(-1, keepdim=True)  # [B, 1]
        den = _group_view(lw, g).sum(-1, keepdim=True)  # [B, 1]
        base = (num / den.clamp(min=1)).expand(-1, g).reshape(-1)  # [N]
        keep = v & ~_group_tied(r, v, g)
        adv = torch.where(keep, r - base, torch.zeros_like(r))  # [N]
        return adv[:, None] * m  # [N, T]


@ADVANTAGES.register("passk")
class PassK(AdvantageEstimator):
    """Pass@k advantage (verl ``adv_estimator=grpo_passk``; verl cites arXiv 2503.19595, unverified):
    only the best sample of each group gets credit, ``A_best = (R_max - R_2nd) / (std_g + eps)``,
    every other sample 0.

    It is the leave-one-out gain of the group's best-of-G reward: removing any sample but the best
    leaves the max unchanged. Ties at the top give no credit (``R_max = R_2nd``); a group with
    fewer than 2 valid samples gets 0. ``scale``: ``"group"`` (unbiased std of the group's valid
    rewards, verl's ``norm_adv_by_std_in_grpo=True``) or ``"none"``.
    """

    requires_groups = True

    def __init__(self, scale: str = "group", eps: float = 1e-6) -> None:
        if scale not in ("group", "none"):
            raise ValueError(f"scale={scale!r} is not valid; valid choices: group, none")
        self.scale = scale
        self.eps = check_range("eps", eps, low=0.0)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        g = int(group_size)
        rg, vg = _group_view(r, g), _group_view(v, g)  # [B, G]
        top = torch.where(vg, rg, torch.full_like(rg, -float("inf"))).topk(2, dim=-1)  # values/indices [B, 2]
        enough = vg.sum(-1) >= 2  # [B]
        gap = torch.where(enough, top.values[:, 0] - top.values[:, 1], torch.zeros_like(rg[:, 0]))  # [B]
        if self.scale == "group":
            _, std, _ = _group_stats(r, v, g, unbiased=True)  # [N]
            sd = _group_view(std, g)[:, 0]  # [B]
            gap = torch.where(gap != 0, gap / (sd + self.eps), torch.zeros_like(gap))
        adv = torch.zeros_like(rg).scatter(-1, top.indices[:, :1], gap[:, None])  # [B, G]
        return adv.reshape(-1)[:, None] * mask.to(r.dtype)  # [N, T]


@ADVANTAGES.register("maxrl")
class MaxRL(AdvantageEstimator):
    """MaxRL (arXiv 2602.02710): ``A_i = (R_i - mean_g R) / (mean_g R + eps)``, the group mean
    reward (a success rate) as the scale instead of the std (prime-rl ``max_rl``, SkyRL ``maxrl``).

    Meant for rewards in [0, 1]: a group whose mean is not positive (all failed) or whose rewards
    are all equal gets A = 0.
    """

    requires_groups = True

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = check_range("eps", eps, low=0.0)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        g = int(group_size)
        mean, _, _ = _group_stats(r, v, g, unbiased=False)  # [N]
        keep = v & ~_group_tied(r, v, g) & (mean > 0)  # [N]
        adv = torch.where(keep, (r - mean) / (mean.clamp(min=0) + self.eps), torch.zeros_like(r))  # [N]
        return adv[:, None] * mask.to(r.dtype)  # [N, T]


@ADVANTAGES.register("gdpo")
class GDPO(AdvantageEstimator, _WarnOnce):
    """GDPO, multi-reward normalisation (arXiv 2601.05242): normalise each reward function within the
    group, then sum with the reward weights, then (``batch_norm``) whiten over the batch:
    ``A = whiten_batch( sum_k w_k * (r_k - mean_g r_k) / (std_g r_k + eps) )``.

    TRL ``multi_objective_aggregation="normalize_then_sum"``; verl ``gdpo``. Its alternative, TRL's
    default ``sum_then_normalize``, is the plain group baseline of the weighted sum
    (``group_baseline``). Needs ``reward_components`` (``dict[str, Tensor [N]]``, raw rewards of
    each function) and optionally ``reward_weights`` (``dict[str, float]``, a missing name weighs
    1.0). Called without components it warns once and treats ``rewards`` as the only component.
    The batch whitening is over the valid samples of all ranks (sample-weighted, unbiased std);
    with one reward function and ``batch_norm=False`` it equals ``group_baseline``.
    """

    requires_groups = True
    needs = ("reward_components",)

    def __init__(self, std: str = "unbiased", eps: float = 1e-6, batch_norm: bool = True) -> None:
        GroupBaseline(scale="group", std=std, eps=eps)  # validates std and eps
        self.std = std
        self.eps = check_range("eps", eps, low=0.0)
        self.batch_norm = bool(batch_norm)

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None,
                 reward_components: dict[str, Tensor] | None = None,
                 reward_weights: dict[str, float] | None = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        if reward_components is None:
            self._warn_missing("reward_components", "normalising the summed reward as one component")
            reward_components = {"reward": rewards}
        weights = dict(reward_weights or {})
        unknown = set(weights) - set(reward_components)
        if unknown:
            raise ValueError(f"reward_weights names {sorted(unknown)} that are not reward_components "
                             f"({sorted(reward_components)})")
        ones = torch.ones(mask.shape[0], 1, dtype=r.dtype, device=mask.device)  # [N, 1]
        per_reward = GroupBaseline(scale="group", std=self.std, eps=self.eps)
        total = torch.zeros_like(r)  # [N]
        for name, comp in reward_components.items():
            if comp.shape != r.shape:
                raise ValueError(f"reward_components[{name!r}] has shape {list(comp.shape)}; expected [N]={list(r.shape)}")
            ak = per_reward(comp.to(r.dtype), ones, group_size=group_size, valid=v)[:, 0]  # [N]
            total = total + float(weights.get(name, 1.0)) * ak
        if self.batch_norm:
            total = _whiten(total, v.to(r.dtype), reduce_sum, self.eps)
        adv = torch.where(v, total, torch.zeros_like(total))  # [N]
        return adv[:, None] * mask.to(r.dtype)  # [N, T]


@ADVANTAGES.register("reward_norm")
class RewardNorm(AdvantageEstimator):
    """Reward normalisation with a choice of level for the mean and the std (ROLL
    ``norm_mean_type`` / ``norm_std_type``): ``A_i = (R_i - mu) / (sigma + eps)``.

    ``mean``: ``"group"`` (the group's mean), ``"batch"`` (the rollout batch's, all ranks),
    ``"running"`` or ``"none"`` (0). ``std``: ``"group"`` (only with ``mean="group"``: a tied
    group would otherwise divide by 0), ``"batch"``, ``"running"`` or ``"none"`` (1, no eps).
    ``"running"`` is an exponential moving average across steps of the batch mean / unbiased
    variance of the raw rewards, updated with this step's batch first (so step 1 equals
    ``"batch"``): ``stat <- (1 - momentum) stat + momentum * batch_stat``; ``momentum=None`` weighs
    every step equally (a cumulative mean). The running state lives in ``state_dict()`` /
    ``load_state_dict()`` so a checkpoint can keep it. ``mean="group", std="batch"`` is Lite PPO
    (arXiv 2508.08221) and TRL ``scale_rewards="batch"``. With a group mean, a tied group gets 0.
    """

    _LEVELS = ("group", "batch", "running", "none")

    def __init__(self, mean: str = "group", std: str = "batch", eps: float = 1e-6,
                 momentum: float | None = 0.1) -> None:
        for key, val in (("mean", mean), ("std", std)):
            if val not in self._LEVELS:
                raise ValueError(f"{key}={val!r} is not valid; valid choices: {', '.join(self._LEVELS)}")
        if std == "group" and mean != "group":
            raise ValueError(f"std='group' needs mean='group' (got mean={mean!r}): a group of equal rewards has std 0")
        self.mean = mean
        self.std = std
        self.eps = check_range("eps", eps, low=0.0)
        self.momentum = None if momentum is None else check_range("momentum", momentum, low=0.0, high=1.0,
                                                                   low_inclusive=False)
        self._run_mean: float | None = None
        self._run_var: float | None = None
        self._steps = 0

    @property
    def requires_groups(self) -> bool:  # type: ignore[override]
        return self.mean == "group"

    def state_dict(self) -> dict:
        return {"mean": self._run_mean, "var": self._run_var, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        missing = {"mean", "var", "steps"} - set(state)
        if missing:
            raise ValueError(f"reward_norm state_dict is missing {sorted(missing)}")
        self._run_mean = None if state["mean"] is None else float(state["mean"])
        self._run_var = None if state["var"] is None else float(state["var"])
        self._steps = int(state["steps"])

    def _update_running(self, n: Tensor, mu: Tensor, var: Tensor) -> None:
        if float(n) < 1:
            return  # no valid reward this step: keep the state
        k = 1.0 if self._steps == 0 else (1.0 / (self._steps + 1) if self.momentum is None else self.momentum)
        mu_f, var_f = float(mu), float(var)
        self._run_mean = mu_f if self._run_mean is None else (1 - k) * self._run_mean + k * mu_f
        self._run_var = var_f if self._run_var is None else (1 - k) * self._run_var + k * var_f
        self._steps += 1

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int | None = None,
                 valid: Tensor | None = None, reduce_sum: ReduceFn = None) -> Tensor:
        r, v = self._prepare(rewards, mask, group_size, valid)  # [N], [N]
        if r.dim() != 1:
            raise ValueError("reward_norm takes one scalar reward per completion: rewards [N]")
        vf = v.to(r.dtype)  # [N]
        n, bmu, bvar = _moments(r, vf, reduce_sum)  # 0-dim x3
        if "running" in (self.mean, self.std):
            self._update_running(n, bmu, bvar)
        run_mu = r.new_tensor(self._run_mean if self._run_mean is not None else 0.0)
        run_sd = r.new_tensor(self._run_var if self._run_var is not None else 0.0).clamp(min=0).sqrt()
        tied = torch.zeros_like(v)
        if self.mean == "group":
            mu, gstd, _ = _group_stats(r, v, int(group_size), unbiased=True)  # [N] x2
            tied = _group_tied(r, v, int(group_size))
        else:
            mu, gstd = {"batch": bmu, "running": run_mu, "none": torch.zeros_like(bmu)}[self.mean], None
        centred = r - mu  # [N]
        if self.std != "none":
            sd = {"group": gstd, "batch": bvar.sqrt(), "running": run_sd}[self.std]
            centred = centred / (sd + self.eps)
        adv = torch.where(v & ~tied, centred, torch.zeros_like(centred))  # [N]
        return adv[:, None] * mask.to(r.dtype)  # [N, T]
