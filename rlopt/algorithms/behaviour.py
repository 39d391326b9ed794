"""Behaviour-policy corrections: the sampler ``mu``, the old policy ``pi_old`` and ``pi_theta``.

Three policies take part in an update (docs/behaviour-correction.md):

- ``mu`` (``sampler_logp``): the policy that generated the tokens, as the rollout engine scored
  them (vLLM / the lean sampler). Its numerics (kernels, bf16, a stale copy of the weights) may
  differ from the trainer's, so ``mu != pi_old`` even for the same weights.
- ``pi_old`` (``old_logp``): the trainer's own log-probs of the same tokens at the start of the
  update (the "old-log-prob pass"): the PPO anchor, AReaL's proximal policy ``pi_prox``.
- ``pi_theta`` (``logp``): the policy being trained.

The PPO ratio is ``pi_theta / pi_old``; a correction handles ``pi_old / mu``. It depends only on
``pi_old`` and ``mu``, so it is computed **once per rollout on the whole batch**:

    corr = CORRECTIONS.build("tis", cap=2.0)
    weight, keep, metrics = corr.weights(old_logp, sampler_logp, mask)    # [N, T], [N, T] bool, {...}

``weight`` is detached and multiplies the **clipped** per-token policy loss before aggregation
(``loss_t = w_t * clip_loss_t``), as verl's ``rollout_corr`` and TRL's vLLM importance sampling
do; it never enters the ratio inside the clip. ``keep`` marks the tokens that survive (masked IS,
rejection sampling). A component with ``renormalise = True`` also removes the rejected tokens
from the loss mask, so the normaliser is counted without them (verl's rejection sampling changes
the response mask); otherwise they stay in the normaliser with zero weight (IcePop, TRL's
``*_mask`` modes, AReaL's capped decoupled weight). ``PolicyObjective.rollout_weights`` combines
the correction with the token masks of ``masks.py`` into one loss mask and one weight.

Levels: ``token`` (``pi_old(y_t)/mu(y_t)``), ``sequence`` (the product over the sequence: the
unbiased sequence-level IS weight, verl/TRL ``sequence``) and ``geometric`` (the geometric mean
``exp(mean_t log(pi_old/mu))``, AReaL's sequence level); a sequence-level weight is broadcast to
every token of the sequence. Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (verl's
``SAFETY_BOUND``); the bounds are compared with the unclamped ratio.

Metrics (``correction/...``, detached 0-dim tensors), over the valid tokens of ``mask``:
``weight_mean|min|max``; ``ess_token`` and ``ess_seq``, the normalised effective sample size
``(sum w)^2 / (n * sum w^2)`` over tokens and over sequences (a sequence's weight is the mean of
its token weights); ``token_frac_high|low`` (fraction of tokens whose ratio or statistic is above
the upper / below the lower bound: truncated or masked), ``seq_frac_high|low`` (fraction of
non-empty sequences with at least one such token); ``token_masked`` / ``seq_masked`` (``keep``
False); ``kl_k1`` and ``kl_k3``, estimates of ``KL(mu || pi_old)`` on the sampled tokens (the
train/inference mismatch).

Padding (``mask == 0``) may hold anything, even inf/NaN: it is zeroed before any math, and gets
weight 0 and ``keep`` False.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import CORRECTIONS, Component, as_float, check_range, check_shapes

#: Levels at which an importance weight is taken.
LEVELS = ("token", "sequence", "geometric")
#: Divergence statistics of rejection sampling (Schulman's k1/k2/k3 estimators of KL(mu || pi_old)).
STATISTICS = ("k1", "k2", "k3")
#: How a rejection statistic is aggregated: per token, or per sequence by sum / mean / max.
AGGREGATES = ("token", "sum", "mean", "max")
#: |log-ratio| clamp before exp (verl rollout_corr_helper.SAFETY_BOUND).
SAFETY_BOUND = 20.0


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; valid choices: {', '.join(choices)}")
    return value


def _log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``x = log pi_old - log mu`` ``[N, T]`` (0 on padding) and the float mask ``[N, T]``."""
    check_shapes(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
    keep = mask != 0  # padding may hold anything, even inf/NaN: zero it before any math
    old = torch.where(keep, as_float(old_logp).detach(), 0.0)  # [N, T]
    mu = torch.where(keep, as_float(sampler_logp).detach(), 0.0)  # [N, T]
    dtype = torch.promote_types(old.dtype, mu.dtype)
    m = keep.to(dtype)  # [N, T]
    return (old.to(dtype) - mu.to(dtype)) * m, m


def level_log_ratio(x: Tensor, m: Tensor, level: str) -> Tensor:
    """Token log-ratios ``x`` ``[N, T]`` at ``level``, broadcast to ``[N, T]`` (unclamped)."""
    if level == "token":
        return x
    total = (x * m).sum(-1, keepdim=True)  # [N, 1]
    if level == "sequence":
        return total.expand_as(x)
    return (total / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(x)  # geometric


def _seq_any(flag: Tensor, m: Tensor) -> Tensor:
    """Fraction of non-empty sequences with at least one valid token flagged (0-dim)."""
    valid = m > 0  # [N, T]
    nonempty = valid.any(-1)  # [N]
    hit = (flag & valid).any(-1) & nonempty  # [N]
    return hit.to(m.dtype).sum() / nonempty.to(m.dtype).sum().clamp(min=1)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def _extreme(x: Tensor, m: Tensor, largest: bool) -> Tensor:
    fill = -math.inf if largest else math.inf
    vals = torch.where(m > 0, x, torch.full_like(x, fill))  # [N, T]
    ext = vals.max() if largest else vals.min()
    return torch.where((m > 0).any(), ext, torch.ones_like(ext))  # 1.0 for an empty batch


def normalised_ess(w: Tensor, m: Tensor) -> Tensor:
    """``(sum w)^2 / (n * sum w^2)`` over the entries with ``m > 0`` (0-dim): 1 for equal weights,
    ``1/n`` for one non-zero weight; 1 for an empty set and 0 when every weight is zero."""
    w = w * m
    n, s1, s2 = m.sum(), w.sum(), (w * w).sum()
    ess = s1 * s1 / (n * s2).clamp(min=torch.finfo(w.dtype).tiny)
    return torch.where(n == 0, torch.ones_like(ess), torch.where(s2 == 0, torch.zeros_like(ess), ess))


@torch.no_grad()
def correction_metrics(weight: Tensor, keep: Tensor, m: Tensor, above: Tensor, below: Tensor,
                       x: Tensor | None = None, prefix: str = "correction") -> dict[str, Tensor]:
    """The ``correction/...`` metrics (module docstring) of a weight ``[N, T]`` and keep mask."""
    w = weight * m  # [N, T]
    lens = m.sum(-1)  # [N]
    nonempty = (lens > 0).to(m.dtype)  # [N]
    seq_w = w.sum(-1) / lens.clamp(min=1)  # [N] mean token weight of each sequence
    out = {
        "weight_mean": _masked_mean(w, m),
        "weight_min": _extreme(w, m, largest=False),
        "weight_max": _extreme(w, m, largest=True),
        "ess_token": normalised_ess(w, m),
        "ess_seq": normalised_ess(seq_w, nonempty),
        "token_frac_high": _masked_mean(above.to(m.dtype), m),
        "token_frac_low": _masked_mean(below.to(m.dtype), m),
        "seq_frac_high": _seq_any(above, m),
        "seq_frac_low": _seq_any(below, m),
        "token_masked": _masked_mean((~keep).to(m.dtype), m),
        "seq_masked": _seq_any(~keep, m),
    }
    if x is not None:  # x = log pi_old - log mu; on tokens sampled from mu:
        xc = x.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        out["kl_k1"] = _masked_mean(-xc, m)  # E_mu[log mu - log pi_old]
        out["kl_k3"] = _masked_mean(torch.expm1(xc) - xc, m)  # E_mu[r - 1 - log r], r = pi_old/mu
    return {f"{prefix}/{k}": v.detach() for k, v in out.items()}


class BehaviourCorrection(Component):
    """Base class: ``weights(old_logp, sampler_logp, mask) -> (weight, keep, metrics)``, once per rollout.

    Attributes the training loop reads:

    - ``needs_sampler_logp``: the rollout engine must return the sampler's log-probs ``mu``.
    - ``replaces_old_logp``: ``pi_old := mu`` (bypass): no old-log-prob pass; the PPO ratio is taken
      against ``sampler_logp``.
    - ``renormalise``: tokens with ``keep`` False leave the loss mask (and the normaliser);
      otherwise they stay in it with weight 0.
    """

    needs_sampler_logp = True
    replaces_old_logp = False
    renormalise = False

    def weights(self, old_logp: Tensor | None, sampler_logp: Tensor | None,
                mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if old_logp is None or sampler_logp is None:
            missing = "old_logp" if old_logp is None else "sampler_logp"
            raise ValueError(f"the {self.registered_name!r} behaviour correction needs {missing} "
                             "(old_logp: the trainer's pi_old; sampler_logp: the sampler's mu)")
        with torch.no_grad():
            x, m = _log_ratio(old_logp, sampler_logp, mask)  # [N, T], [N, T]
            weight, keep, above, below = self._weights(x, m)  # [N, T] each
            valid = m > 0
            keep = keep & valid
            weight = torch.where(keep, weight, torch.zeros_like(weight))  # [N, T]
            metrics = correction_metrics(weight, keep, m, above & valid, below & valid, x)
        return weight.detach(), keep, metrics

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(weight, keep, above, below)`` from ``x = log pi_old - log mu`` ``[N, T]``."""
        raise NotImplementedError



@CORRECTIONS.register("none")
class NoCorrection(BehaviourCorrection):
    """No correction: weight 1 on every valid token. Given both ``old_logp`` and ``sampler_logp``,
    it still reports the mismatch metrics (``correction/kl_k1``, ``kl_k3``, ...)."""

    needs_sampler_logp = False

    def weights(self, old_logp: Tensor | None, sampler_logp: Tensor | None,
                mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if old_logp is not None and sampler_logp is not None:
            return super().weights(old_logp, sampler_logp, mask)
        keep = mask != 0  # [N, T]
        dtype = mask.dtype if mask.dtype.is_floating_point else torch.float32
        ref = old_logp if old_logp is not None else sampler_logp
        if ref is not None:
            dtype = as_float(ref).dtype
        return keep.to(dtype), keep, {}

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        none = torch.zeros_like(m, dtype=torch.bool)
        return torch.ones_like(x), m > 0, none, none


class _LevelIS(BehaviourCorrection):
    """Shared code of the importance-weight corrections: ``rho = pi_old/mu`` at ``level``."""

    def __init__(self, level: str = "token") -> None:
        self.level = _check_choice("level", level, LEVELS)

    def _rho(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """``(rho clamped for use, rho unclamped for the bounds)``, both ``[N, T]``."""
        lr = level_log_ratio(x, m, self.level)  # [N, T]
        return lr.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp(), lr.exp()


@CORRECTIONS.register("tis")
class TruncatedIS(_LevelIS):
    """Truncated importance sampling ``w = min(pi_old/mu, cap)`` (TIS; Retrace's truncated
    weights, arXiv 1606.02647; Yao et al.'s off-policy blog for LLM RL; verl ``rollout_is`` with a
    single threshold, TRL ``*_truncate``, slime ``--use-tis``). ``cap=inf`` is plain IS.
    Every token is kept; ``token_frac_high`` counts the truncated ones."""

    def __init__(self, cap: float = 2.0, level: str = "token") -> None:
        super().__init__(level)
        self.cap = check_range("cap", cap, low=0.0, low_inclusive=False)

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rho, raw = self._rho(x, m)  # [N, T]
        return rho.clamp(max=self.cap), m > 0, raw > self.cap, torch.zeros_like(raw, dtype=torch.bool)


@CORRECTIONS.register("mis")
class MaskedIS(_LevelIS):
    """Masked importance sampling ``w = rho * 1[lo <= rho <= hi]``, ``rho = pi_old/mu`` (IcePop,
    arXiv 2510.18855: [0.5, 5] at token level; TRL ``token_mask`` / ``sequence_mask`` with
    ``[0, 3]``; verl ``rollout_is_threshold="lo_hi"``). Tokens (sequences) outside the bounds get
    weight 0 and ``keep`` False; with ``renormalise=False`` (IcePop, verl, TRL) they stay in the
    normaliser. ``lo=0, hi=inf`` is plain IS (= ``TruncatedIS(cap=inf)``)."""

    def __init__(self, lo: float = 0.5, hi: float = 5.0, level: str = "token", renormalise: bool = False) -> None:
        super().__init__(level)
        self.lo = check_range("lo", lo, low=0.0)
        self.hi = check_range("hi", hi, low=self.lo, low_inclusive=False)
        self.renormalise = bool(renormalise)

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rho, raw = self._rho(x, m)  # [N, T]
        above, below = raw > self.hi, raw < self.lo  # [N, T]
        keep = ~(above | below)
        return torch.where(keep, rho, torch.zeros_like(rho)), keep, above, below


@CORRECTIONS.register("rejection")
class RejectionSampling(BehaviourCorrection):
    """Rejection sampling of tokens or sequences by a divergence statistic between pi_old and mu
    (verl ``rollout_rs``: token_k*, seq_sum_k*, seq_mean_k*, seq_max_k*; AReaL
    ``rejection_sampling``). With ``x = log pi_old - log mu`` (clamped to +-20) per token:
    ``k1 = -x = log mu - log pi_old``, ``k2 = x^2 / 2``, ``k3 = exp(x) - 1 - x``, Schulman's
    estimators of ``KL(mu || pi_old)`` on tokens sampled from mu. ``agg``: ``token`` (each token on
    its own), ``sum`` / ``mean`` / ``max`` over the sequence (the whole sequence is kept or
    rejected). Kept: ``lo <= stat <= hi`` (``None``: unbounded on that side). The weight is 1 on
    kept tokens; ``renormalise=True`` (verl: the response mask shrinks) takes the rejected tokens
    out of the normaliser. Default: verl's ``decoupled_geo_rs``, ``seq_mean_k1`` within
    ``log(0.999)..log(1.001)`` ~ +-1e-3."""

    renormalise = True

    def __init__(self, statistic: str = "k1", agg: str = "mean", lo: float | None = -1e-3,
                 hi: float | None = 1e-3, renormalise: bool = True) -> None:
        self.statistic = _check_choice("statistic", statistic, STATISTICS)
        self.agg = _check_choice("agg", agg, AGGREGATES)
        self.lo = None if lo is None else check_range("lo", lo)
        self.hi = None if hi is None else check_range("hi", hi, low=self.lo)
        if self.lo is None and self.hi is None:
            raise ValueError("rejection sampling needs a bound: set lo and/or hi")
        self.renormalise = bool(renormalise)

    def statistic_values(self, x: Tensor, m: Tensor) -> Tensor:
        """The statistic broadcast to ``[N, T]`` (sequence aggregates on every token)."""
        xc = x.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        tok = {"k1": -xc, "k2": 0.5 * xc * xc, "k3": torch.expm1(xc) - xc}[self.statistic] * m  # [N, T]
        if self.agg == "token":
            return tok
        if self.agg == "sum":
            seq = tok.sum(-1, keepdim=True)  # [N, 1]
        elif self.agg == "mean":
            seq = tok.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        else:  # max over the valid tokens; 0 for an empty row
            vals = torch.where(m > 0, tok, torch.full_like(tok, -math.inf))
            seq = vals.max(-1, keepdim=True).values
            seq = torch.where(torch.isfinite(seq), seq, torch.zeros_like(seq))
        return seq.expand_as(tok)

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        stat = self.statistic_values(x, m)  # [N, T]
        none = torch.zeros_like(stat, dtype=torch.bool)
        above = none if self.hi is None else stat > self.hi
        below = none if self.lo is None else stat < self.lo
        keep = ~(above | below)
        return keep.to(x.dtype), keep, above, below


@CORRECTIONS.register("bypass")
class Bypass(BehaviourCorrection):
    """Bypass mode, ``pi_old := mu`` (verl ``bypass_mode``; AReaL without recompute): the PPO ratio
    is taken against the sampler's log-probs, so the clip itself bounds ``pi_theta/mu`` and no
    old-log-prob pass is needed (``replaces_old_logp``). The weight is 1: ``pi_old/mu`` is 1 by
    definition. The training loop passes ``sampler_logp`` and ``PolicyObjective`` substitutes it for
    ``old_logp``."""

    replaces_old_logp = True

    def weights(self, old_logp: Tensor | None, sampler_logp: Tensor | None,
                mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if sampler_logp is None:
            raise ValueError("the 'bypass' behaviour correction needs sampler_logp (the sampler's mu: "
                             "it replaces old_logp)")
        return super().weights(sampler_logp, sampler_logp, mask)

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        none = torch.zeros_like(m, dtype=torch.bool)
        return torch.ones_like(x), m > 0, none, none


@CORRECTIONS.register("decoupled")
class DecoupledPPO(_LevelIS):
    """AReaL's decoupled PPO (arXiv 2505.24298, eq. 5): ``loss = -(pi_prox/mu) * min(r A, clip(r) A)``
    with ``r = pi_theta / pi_prox``; ``pi_prox`` is the recomputed old-log-prob pass (``old_logp``).
    The behaviour weight ``pi_prox/mu`` is optionally capped (AReaL ``behave_imp_weight_cap``,
    must be > 1): ``mode="mask"`` zeroes weights above the cap (AReaL's default ``token_mask``),
    ``"truncate"`` clamps them. The masked tokens stay in the normaliser (AReaL divides by the
    loss-mask count). ``level``: AReaL's ``sequence_*`` modes are the geometric mean here."""

    def __init__(self, cap: float | None = 5.0, mode: str = "mask", level: str = "token") -> None:
        super().__init__(level)
        self.cap = None if cap is None else check_range("cap", cap, low=1.0, low_inclusive=False)
        self.mode = _check_choice("mode", mode, ("mask", "truncate"))

    def _weights(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rho, raw = self._rho(x, m)  # [N, T]
        none = torch.zeros_like(raw, dtype=torch.bool)
        if self.cap is None:
            return rho, m > 0, none, none
        above = raw > self.cap
        if self.mode == "truncate":
            return rho.clamp(max=self.cap), m > 0, above, none
        return torch.where(above, torch.zeros_like(rho), rho), ~above, above, none
