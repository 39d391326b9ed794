"""Trust regions beyond the PPO clip: soft gates (SAPO), probability-space masks (DPPO), sign-
dependent weights (TOPR), gamma weights (VESPO), CISPO's absolute cap, Kimi-1.5's squared
log-ratio penalty, GMPO's clipped geometric mean and the plain policy gradient. Same contract as
clipping.py: ``clip(ratio, adv, log_ratio[, logp=, old_logp=, mask=]) -> (loss_tok, flags)``.

    loss_tok, flags = SAPOClip(tau_pos=1.0, tau_neg=1.05)(ratio, adv, log_ratio)   # [N, T], {flag: [N, T]}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .clipping import CLIP_FLAGS, ClipStrategy
from .registry import CLIPPING, as_float, check_range


def _no_flags(like: Tensor) -> dict[str, Tensor]:
    """Every flag all-False: the strategy never zeroes a token's gradient (soft gates, weights)."""
    none = torch.zeros_like(like, dtype=torch.bool)  # [N, T]
    return {name: none for name in CLIP_FLAGS}


def _logps(logp: Tensor | None, old_logp: Tensor | None, mask: Tensor | None,
           who: str) -> tuple[Tensor, Tensor, Tensor]:
    """The extra inputs of a ``needs_logp`` strategy, padding zeroed, old log-probs detached."""
    if logp is None or old_logp is None or mask is None:
        raise ValueError(f"the {who!r} clipping strategy needs logp=, old_logp= and mask= (it has "
                         "needs_logp=True; PolicyObjective passes them)")
    keep = mask != 0  # [N, T]
    lp = torch.where(keep, as_float(logp).detach(), 0.0)  # [N, T]
    olp = torch.where(keep, as_float(old_logp).detach(), 0.0)  # [N, T]
    return lp, olp, mask.to(lp.dtype)


@CLIPPING.register("sapo")
class SAPOClip(ClipStrategy):
    """SAPO soft gate (Soft Adaptive Policy Optimization, arXiv 2511.20347):
    ``loss = -(4/tau) * sigmoid(tau * (w - 1)) * A`` with ``tau = tau_pos`` if ``A > 0`` else ``tau_neg``.

    The sigmoid replaces the hard clip: the gradient wrt ``log w`` is ``-A * w * 4 s (1 - s)`` with
    ``s = sigmoid(tau (w - 1))``, which equals the plain policy gradient ``-A`` at ``w = 1``
    (``4/tau * sigmoid'(0) * tau = 1``) and decays smoothly as ``w`` leaves 1, faster for the
    larger ``tau``. Defaults 1.0 / 1.05 are the paper's (also TRL ``sapo_temperature_pos/_neg``
    and verl ``tau_pos/tau_neg``). No token's gradient is ever zeroed, so every flag is False.
    """

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05) -> None:
        self.tau_pos = check_range("tau_pos", tau_pos, low=0.0, low_inclusive=False)
        self.tau_neg = check_range("tau_neg", tau_neg, low=0.0, low_inclusive=False)

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tau = torch.where(adv > 0, torch.full_like(ratio, self.tau_pos), torch.full_like(ratio, self.tau_neg))  # [N, T]
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)  # [N, T]
        return -gate * adv, _no_flags(ratio)


class _DPPOClip(ClipStrategy):
    """Shared part of the DPPO binary trust regions (arXiv 2602.04879): a token is dropped when the
    policy moved its probability too far *in the direction the advantage pushes*; the kept tokens
    get ``-A * sg(min(w, cap)) * log w`` (gradient ``-A sg(min(w, cap)) grad logp``).

    ``delta_low`` / ``delta_high`` bound the move down (``A < 0``) / up (``A > 0``). ``cap``
    truncates the importance weight (verl's ``clip_ratio_c``); None (the authors' recipe, which
    sets it to 1e4) leaves it untruncated. Flags: ``high`` = dropped with ``A > 0``, ``low`` =
    dropped with ``A < 0``, ``region`` = either (their gradient is zero), ``outside`` = beyond
    either bound whatever the sign of A; ``cap`` is unused (the truncation keeps a gradient).
    """

    needs_logp = True

    def __init__(self, delta_low: float, delta_high: float | None = None, cap: float | None = None) -> None:
        self.delta_low = check_range("delta_low", delta_low, low=0.0, low_inclusive=False)
        self.delta_high = self.delta_low if delta_high is None else check_range(
            "delta_high", delta_high, low=0.0, low_inclusive=False)
        self.cap = None if cap is None else check_range("cap", cap, low=0.0, low_inclusive=False)

    def _moved(self, lp: Tensor, olp: Tensor) -> tuple[Tensor, Tensor]:
        """``(too_far_up, too_far_down)``, bool ``[N, T]``."""
        raise NotImplementedError

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor, logp: Tensor | None = None,
                 old_logp: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        lp, olp, m = _logps(logp, old_logp, mask, self.registered_name)  # [N, T] x3
        up, down = self._moved(lp, olp)  # [N, T] bool
        up, down = up & (m > 0), down & (m > 0)
        high, low = up & (adv > 0), down & (adv < 0)  # [N, T]
        dropped = torch.where(adv > 0, up, down)  # [N, T]; A == 0 has zero loss either way
        weight = ratio.detach() if self.cap is None else ratio.detach().clamp(max=self.cap)  # [N, T]
        loss = -adv * weight * log_ratio * (~dropped).to(ratio.dtype)  # [N, T]
        none = torch.zeros_like(high)
        return loss, {"low": low, "high": high, "region": low | high, "cap": none, "outside": up | down}


@CLIPPING.register("dppo_tv")
class DPPOTVClip(_DPPOClip):
    """DPPO-Binary-TV (arXiv 2602.04879): drop a token when ``p - p_old > delta_high`` with ``A > 0``
    or ``p - p_old < -delta_low`` with ``A < 0`` (``p = exp(logp)`` of the sampled token: the
    binary total-variation distance). Kept tokens: ``-A * sg(min(w, cap)) * log w``.

    Defaults 0.15 / 0.15 and no cap are the authors' recipe (verl examples/dppo_trainer,
    ``clip_ratio_c=1e4``); prime-rl's ``dppo_mask_low/high`` default to 0.2.
    """

    def __init__(self, delta_low: float = 0.15, delta_high: float | None = 0.15, cap: float | None = None) -> None:
        super().__init__(delta_low, delta_high, cap)
        if self.delta_low > 1 or self.delta_high > 1:
            raise ValueError(f"delta_low={delta_low!r} / delta_high={delta_high!r}: a probability difference "
                             "is at most 1; expected values in (0, 1]")

    def _moved(self, lp: Tensor, olp: Tensor) -> tuple[Tensor, Tensor]:
        diff = lp.exp() - olp.exp()  # [N, T]
        return diff > self.delta_high, diff < -self.delta_low


@CLIPPING.register("dppo_kl")
class DPPOKLClip(_DPPOClip):
    """DPPO-Binary-KL (arXiv 2602.04879): the binary KL
    ``KL(p_old || p) = p_old log(p_old/p) + (1-p_old) log((1-p_old)/(1-p))`` of the sampled token;
    a token whose probability went up (``A > 0``) or down (``A < 0``) with a binary KL above
    ``delta_high`` / ``delta_low`` is dropped. Kept tokens: ``-A * sg(min(w, cap)) * log w``.

    ``1 - p`` is computed as ``-expm1(logp)`` and floored at the dtype's ``tiny`` so ``p = 1`` stays
    finite. Defaults 0.05 / 0.05 and no cap are the authors' recipe (verl examples/dppo_trainer).
    """

    def __init__(self, delta_low: float = 0.05, delta_high: float | None = 0.05, cap: float | None = None) -> None:
        super().__init__(delta_low, delta_high, cap)

    def _moved(self, lp: Tensor, olp: Tensor) -> tuple[Tensor, Tensor]:
        tiny = torch.finfo(lp.dtype).tiny
        p, p_old = lp.exp(), olp.exp()  # [N, T]
        q, q_old = (-torch.expm1(lp)).clamp(min=tiny), (-torch.expm1(olp)).clamp(min=tiny)  # 1 - p, 1 - p_old
        kl = p_old * (olp - lp) + (1.0 - p_old) * (q_old.log() - q.log())  # [N, T]
        return (kl > self.delta_high) & (p > p_old), (kl > self.delta_low) & (p < p_old)


@CLIPPING.register("topr")
class TOPRClip(ClipStrategy):
    """TOPR, Tapered Off-Policy REINFORCE (arXiv 2503.14286):
    ``A > 0: -A * log w``; ``A <= 0: -sg(clip(w, 0, 1)) * A * log w``.

    Positive examples get the plain REINFORCE gradient whatever the staleness; negative ones are
    down-weighted by the importance weight truncated at 1. The paper applies it to the *sequence*
    probability ratio: use it with ``ratio: product`` and ``seq_mean_token_mean`` (the ``topr``
    preset), or with ``ratio: token`` for ROLL's per-token form. ``outside`` flags the tokens whose
    weight was truncated (``A <= 0`` and ``w > 1``); no gradient is zeroed.
    """

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        weight = torch.where(adv > 0, torch.ones_like(ratio), ratio.detach().clamp(0.0, 1.0))  # [N, T]
        flags = _no_flags(ratio)
        flags["outside"] = (adv <= 0) & (ratio > 1.0)
        return -weight * adv * log_ratio, flags


@CLIPPING.register("vespo")
class VESPOClip(ClipStrategy):
    """VESPO gamma weight (arXiv 2602.10693): ``loss = -sg(phi) * A * log w_t`` with the sequence
    weight ``phi(W) = W^k * exp(lambda * (1 - W))`` (a gamma-shaped curve, ``phi(1) = 1``), where
    ``W = prod_t pi(y_t)/pi_old(y_t)`` is the *product* of the sequence's token ratios.

    ``(k, lambda)`` = ``(k_pos, lambda_pos)`` where ``A >= 0`` and ``(k_neg, lambda_neg)`` where
    ``A < 0``; defaults 2/3 and 3/2 are TRL's (``vespo_k_pos`` ...). ``phi`` is computed in log
    space, ``log phi = lambda + k log W - lambda W``, with each token log-ratio clamped to
    ``[-20, 20]`` and ``log W`` to ``[log 1e-8, 20]`` (as TRL, so the weight stays finite). ``W``
    is built here from ``logp``/``old_logp`` (``needs_logp``) over the mask, whatever the ratio
    axis; the ratio axis only supplies the per-token surrogate ``log w_t`` (use ``ratio: token``).
    TRL also multiplies ``W`` by the vLLM behaviour ratio: that belongs to the behaviour-correction
    axis and is not included. Soft weight: every flag is False.
    """

    needs_logp = True
    _LOG_W_MIN = math.log(1e-8)
    _LOG_W_MAX = 20.0

    def __init__(self, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0) -> None:
        self.k_pos = check_range("k_pos", k_pos, low=0.0)
        self.lambda_pos = check_range("lambda_pos", lambda_pos, low=0.0)
        self.k_neg = check_range("k_neg", k_neg, low=0.0)
        self.lambda_neg = check_range("lambda_neg", lambda_neg, low=0.0)

    def weight(self, adv: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
        """``phi`` per token ``[N, T]`` (detached)."""
        lp, olp, m = _logps(logp, old_logp, mask, "vespo")  # [N, T] x3
        log_w = ((lp - olp).clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)  # [N, 1]
        log_w = log_w.clamp(self._LOG_W_MIN, self._LOG_W_MAX)
        pos = adv >= 0  # [N, T]
        k = torch.where(pos, torch.full_like(adv, self.k_pos), torch.full_like(adv, self.k_neg))  # [N, T]
        lam = torch.where(pos, torch.full_like(adv, self.lambda_pos), torch.full_like(adv, self.lambda_neg))  # [N, T]
        return torch.exp(lam + k * log_w - lam * log_w.exp())  # [N, T]

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor, logp: Tensor | None = None,
                 old_logp: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        phi = self.weight(adv, logp, old_logp, mask).to(ratio.dtype)  # [N, T]
        return -phi * adv * log_ratio, _no_flags(ratio)


@CLIPPING.register("weight_abs")
class WeightAbsClip(ClipStrategy):
    """CISPO with an absolute cap: ``-sg(min(w, cap)) * A * log w`` (upper bound only).

    TRL's ``loss_type="cispo"`` clamps the weight at ``epsilon_high`` read as an absolute value, and
    ScaleRL (arXiv 2510.13786) uses 5.0 (the default). CISPO's own form (MiniMax-M1, arXiv
    2506.13585) is relative, ``clip(w, 1-eps_low, 1+eps_high)``: that is ``weight`` (``clip: cispo``).
    ``outside`` flags the truncated tokens (``w > cap``); no gradient is zeroed.
    """

    def __init__(self, cap: float = 5.0) -> None:
        self.cap = check_range("cap", cap, low=0.0, low_inclusive=False)

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        weight = ratio.detach().clamp(max=self.cap)  # [N, T]
        flags = _no_flags(ratio)
        flags["outside"] = ratio > self.cap
        return -weight * adv * log_ratio, flags


@CLIPPING.register("kimi15")
class Kimi15Loss(ClipStrategy):
    """Kimi k1.5 (arXiv 2501.12599 eq. 3) / DRO: policy gradient plus a squared log-ratio penalty
    anchored to the *old* policy: ``-A * log pi + (tau/2) (log pi - log pi_old)^2``, written in
    ratio form ``-A * log w + (tau/2) (log w)^2`` (same gradient ``(-A + tau log w) grad logp``).

    The paper penalises the *sequence* log-ratio: use ``ratio: product`` with
    ``seq_mean_token_mean`` (the ``kimi15`` preset: per sequence ``-A S + tau/2 S^2`` with
    ``S = sum_t log w_t``); ``ratio: token`` gives ROLL's / verl ``dro``'s per-token penalty.
    ``tau`` 0.1 is ROLL's ``kimi15_tau`` default. No clip: every flag is False.
    """

    def __init__(self, tau: float = 0.1) -> None:
        self.tau = check_range("tau", tau, low=0.0)

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return -adv * log_ratio + 0.5 * self.tau * log_ratio ** 2, _no_flags(ratio)


@CLIPPING.register("gmpo")
class GMPOClip(ClipStrategy):
    """GMPO, Geometric-Mean Policy Optimization (arXiv 2507.20673): per-token clipping in log space
    *inside* a per-sequence geometric mean.

    ``l_t = log w_t``; ``l~_t = sgn(A) * min(sgn(A) l_t, sgn(A) clip(l_t, -eps_low, eps_high))`` (an
    ``A > 0`` token is clipped from above only, an ``A < 0`` token from below only);
    ``G_i = exp(mean_t l~_t)`` over the row's tokens; ``loss_t = -A_t * G_i`` on every token, so
    ``seq_mean_token_mean`` gives the paper's ``mean_i(-A_i G_i)``. ``eps`` 0.4 (log space) is the
    paper's and TRL ``GMPOConfig.epsilon``. This fuses ratio and clip, and the clip needs the sign
    of A, which a ratio scheme does not see: so it is a clipping strategy that takes the per-token
    log-ratios of ``ratio: token`` (``needs_logp`` only for the mask). With infinite eps it equals
    ``ratio: sequence`` + ``clip: none``; clipping per token differs from the sequence ratio + PPO
    clip. Flags: ``high`` = ``A > 0`` and ``l_t > eps_high``, ``low`` = ``A < 0`` and
    ``l_t < -eps_low`` (the clipped tokens: no gradient), ``outside`` = beyond either bound.
    """

    needs_logp = True

    def __init__(self, eps_low: float = 0.4, eps_high: float | None = None) -> None:
        self.eps_low = check_range("eps_low", eps_low, low=0.0, low_inclusive=False)
        self.eps_high = self.eps_low if eps_high is None else check_range("eps_high", eps_high, low=0.0, low_inclusive=False)

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor, logp: Tensor | None = None,
                 old_logp: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if mask is None:
            raise ValueError("the 'gmpo' clipping strategy needs mask= (PolicyObjective passes it)")
        m = mask.to(log_ratio.dtype)  # [N, T]
        sgn = torch.sign(adv)  # [N, T]
        clipped = log_ratio.clamp(-self.eps_low, self.eps_high)  # [N, T]
        lt = sgn * torch.minimum(sgn * log_ratio, sgn * clipped)  # [N, T]
        seq = (lt * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
        loss = -adv * torch.exp(seq)  # [N, T]
        high = (adv > 0) & (log_ratio > self.eps_high)  # [N, T]
        low = (adv < 0) & (log_ratio < -self.eps_low)  # [N, T]
        outside = (log_ratio > self.eps_high) | (log_ratio < -self.eps_low)
        return loss, {"low": low, "high": high, "region": low | high, "cap": torch.zeros_like(low), "outside": outside}


@CLIPPING.register("pg")
class PolicyGradient(ClipStrategy):
    """Plain policy gradient on the log-probability: ``-A * log w`` (value 0 at ``w = 1``, gradient
    ``-A grad logp`` whatever the staleness: no importance weight, no clip).

    GPG (arXiv 2504.02546; verl ``loss_mode=gpg``) and ROLL ``pg_variant=vanilla``. On-policy it
    has the gradient of ``clip: none``; off-policy it ignores the ratio.
    """

    def __call__(self, ratio: Tensor, adv: Tensor, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return -adv * log_ratio, _no_flags(ratio)
