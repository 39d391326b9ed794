"""Token masks: which tokens the policy loss trains on (docs/behaviour-correction.md).

    m = MASKS.build("high_entropy", rho=0.2)
    keep, metrics, penalty = m(MaskInputs(mask=mask, entropy=entropy, gather=all_gather))   # [N, T] bool

A mask returns a boolean ``keep`` ``[N, T]`` (False on padding), metrics and, for KL-Cov only, a
per-token ``penalty`` added to the policy loss. Masks are orthogonal to clipping and to the
behaviour correction. There are two kinds:

- **per rollout** (``per_rollout = True``): computed once on the whole rollout batch at collect
  time, from inputs known then (``truncated``, the entropy under pi_old, advantages, pi_old and
  mu log-probs). ``PolicyObjective.rollout_weights`` applies them: with ``renormalise = True`` the
  dropped tokens leave the loss mask (and so the normaliser, counted once over the whole batch);
  otherwise they stay in the normaliser with weight 0. Either way minibatches stay exact.
  Batch statistics (the entropy quantile, M2PO's second moment) are taken over the batch of all
  ranks through ``gather``: a callable that all-gathers a 1-D tensor of this rank's values
  (lengths may differ between ranks; it must be called on every rank, even with 0 values) and
  returns the concatenation (default: identity, one process).
- **per minibatch** (``per_rollout = False``): they need pi_theta, so ``PolicyObjective.__call__``
  computes them on the rows it is given, as a gradient-stopping mask on the per-token loss that
  does **not** change the normaliser (Clip-Cov, OPSM; KL-Cov adds its penalty instead).

Metrics: ``mask/<name>_frac`` is the fraction of the valid tokens the mask removes (for KL-Cov:
penalises), ``mask/<name>_frac_pos`` / ``_frac_neg`` the same fraction among the tokens with a
positive / negative advantage (0 when there are none). ``<name>`` is the key the mask has in the
objective's ``masks`` dict (by default its registered name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .registry import MASKS, Component, as_float, check_range

GatherFn = Callable[[Tensor], Tensor]

#: The inputs a mask may declare in ``requires``.
MASK_INPUTS = ("advantages", "old_logp", "sampler_logp", "entropy", "truncated", "logp")


def identity_gather(x: Tensor) -> Tensor:
    """The ``gather`` of a single process: this rank's values are the whole batch."""
    return x


@dataclass
class MaskInputs:
    """What a mask may look at. All ``[N, T]`` except ``truncated`` ``[N]``."""

    mask: Tensor  # [N, T] the loss mask the mask sees (1 = a valid token)
    advantages: Tensor | None = None  # [N, T]
    old_logp: Tensor | None = None  # [N, T] pi_old
    sampler_logp: Tensor | None = None  # [N, T] mu
    entropy: Tensor | None = None  # [N, T] per-token entropy (under pi_old for per-rollout masks)
    truncated: Tensor | None = None  # [N] bool: the completion hit the length budget
    logp: Tensor | None = None  # [N, T] pi_theta, with its gradient (per-minibatch masks only)
    clip_flags: dict[str, Tensor] | None = None  # the clip strategy's flags, {k: [N, T] bool}
    gather: GatherFn | None = None  # all-gather of a 1-D tensor over ranks (per-rollout masks)
    generator: torch.Generator | None = None  # CPU generator for random choices (Clip-Cov)


class MaskResult(NamedTuple):
    keep: Tensor  # [N, T] bool, False on padding
    metrics: dict[str, Tensor]
    penalty: Tensor | None = None  # [N, T] added to the per-token policy loss (KL-Cov)


@torch.no_grad()
def mask_metrics(name: str, flagged: Tensor, valid: Tensor, adv: Tensor | None) -> dict[str, Tensor]:
    """``mask/<name>_frac[_pos|_neg]``: flagged fraction of the valid tokens (by advantage sign)."""
    f = (flagged & valid).float()  # [N, T]
    out = {f"mask/{name}_frac": f.sum() / valid.float().sum().clamp(min=1)}
    for sign, sel in (("pos", None if adv is None else adv > 0), ("neg", None if adv is None else adv < 0)):
        if sel is None:
            out[f"mask/{name}_frac_{sign}"] = torch.zeros((), device=f.device)
            continue
        sel = (sel & valid).float()
        out[f"mask/{name}_frac_{sign}"] = (f * sel).sum() / sel.sum().clamp(min=1)
    return out


def quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of a 1-D tensor with linear interpolation (``torch.quantile``'s default),
    by sorting, so it has no size limit. ``-inf`` for an empty tensor."""
    if values.numel() == 0:
        return torch.full((), -math.inf, dtype=values.dtype, device=values.device)
    s = values.sort().values  # [n]
    pos = q * (s.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class TokenMask(Component):
    """Base class: ``__call__(MaskInputs) -> MaskResult``.

    ``per_rollout``: computed once per rollout (True) or per minibatch inside the objective
    (False). ``renormalise``: a per-rollout mask's dropped tokens also leave the loss mask and the
    normaliser. ``requires``: the ``MaskInputs`` fields that must be given.
    """

    per_rollout = True
    renormalise = False
    requires: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return getattr(self, "_name", None) or self.registered_name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    def __call__(self, inp: MaskInputs) -> MaskResult:
        for field in self.requires:
            if getattr(inp, field) is None:
                raise ValueError(f"the {self.name!r} mask ({self.registered_name}) needs {field}")
        valid = inp.mask != 0  # [N, T]
        adv = None
        if inp.advantages is not None:
            adv = torch.where(valid, as_float(inp.advantages).detach(), 0.0)  # [N, T]
        keep, penalty, flagged, extra = self._apply(inp, valid, adv)
        keep = keep & valid
        metrics = mask_metrics(self.name, flagged if flagged is not None else ~keep, valid, adv)
        metrics.update({f"mask/{self.name}_{k}": v.detach() for k, v in extra.items()})
        return MaskResult(keep, metrics, penalty)

    def _apply(self, inp: MaskInputs, valid: Tensor, adv: Tensor | None
               ) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
        """``(keep [N, T] bool, penalty or None, flagged for the metrics or None (= ~keep), extra metrics)``."""
        raise NotImplementedError



def _masked(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, as_float(x).detach(), 0.0)


# --- per rollout -----------------------------------------------------------------------------------

@MASKS.register("truncated")
class TruncatedMask(TokenMask):
    """Overlong filtering: drop the completions that hit the length budget (DAPO, arXiv 2503.14476
    §3.4; TRL ``mask_truncated_completions``, AReaL ``mask_no_eos_with_zero``). Needs
    ``truncated [N] bool``. They leave the normaliser (``renormalise=True``, as TRL's completion mask)."""

    requires = ("truncated",)

    def __init__(self, renormalise: bool = True) -> None:
        self.renormalise = bool(renormalise)

    def _apply(self, inp, valid, adv):
        trunc = inp.truncated.to(device=valid.device).bool()
        if trunc.shape != valid.shape[:1]:
            raise ValueError(f"truncated must be [N]={valid.shape[0]}, got shape {list(trunc.shape)}")
        return (~trunc)[:, None].expand_as(valid), None, None, {}


@MASKS.register("high_entropy")
class HighEntropyMask(TokenMask):
    """The 80/20 rule (Wang et al., arXiv 2506.01939): train only on the tokens whose entropy is at
    or above the ``1 - rho`` quantile of the entropies of all valid tokens of the rollout batch of
    all ranks (``gather``), ``rho = 0.2``. TRL ``top_entropy_quantile`` (= ``rho``), with linear
    interpolation as ``torch.quantile``. Needs ``entropy`` under pi_old (the old-log-prob pass).
    ``rho = 1`` keeps every token. Dropped tokens stay in the normaliser (``renormalise=False``:
    the paper's and TRL's normaliser counts every token)."""

    requires = ("entropy",)

    def __init__(self, rho: float = 0.2, renormalise: bool = False) -> None:
        self.rho = check_range("rho", rho, low=0.0, high=1.0, low_inclusive=False)
        self.renormalise = bool(renormalise)

    def _apply(self, inp, valid, adv):
        ent = _masked(inp.entropy, valid)  # [N, T]
        gathered = (inp.gather or identity_gather)(ent[valid])  # [n_all]
        thr = quantile(gathered.to(ent.dtype), 1.0 - self.rho)
        keep = ent >= thr.to(ent.device)
        shown = torch.where(torch.isfinite(thr), thr, torch.zeros_like(thr))  # 0 for an empty batch
        return keep, None, None, {"threshold": shown}


@MASKS.register("m2po")
class M2POMask(TokenMask):
    """M2PO (Zheng et al., arXiv 2510.01161): mask the tokens with the largest second moment
    ``m2_t = (log pi_old - log mu)^2`` until the mean of the rest over the batch of all ranks
    (``gather``) is below ``tau`` (AReaL ``m2_threshold``, 0.04 in its gsm8k_m2po example). With
    the values of the batch sorted descending ``s_0 >= s_1 >= ...``, ``k`` is the first index with
    ``mean(s_k, s_{k+1}, ...) < tau`` and the tokens with ``m2_t >= s_{k-1}`` are masked (ties at
    the boundary are masked too, so every rank decides from the value alone). If no suffix mean is
    below ``tau`` every token is masked (AReaL keeps one). Masked tokens stay in the normaliser
    (``renormalise=False``: the paper's objective divides by all tokens; AReaL keeps the
    denominator). Needs ``old_logp`` and ``sampler_logp``."""

    requires = ("old_logp", "sampler_logp")

    def __init__(self, tau: float = 0.04, renormalise: bool = False) -> None:
        self.tau = check_range("tau", tau, low=0.0, low_inclusive=False)
        self.renormalise = bool(renormalise)

    def _apply(self, inp, valid, adv):
        x = _masked(inp.old_logp, valid) - _masked(inp.sampler_logp, valid)  # [N, T]
        m2 = x * x  # [N, T]
        s = (inp.gather or identity_gather)(m2[valid]).to(m2.dtype).sort(descending=True).values  # [n_all]
        n = s.numel()
        before = s.sum() / max(n, 1)
        if n == 0:
            return valid, None, None, {"m2_before": before, "m2_after": before}
        suffix_mean = s.flip(0).cumsum(0).flip(0) / torch.arange(n, 0, -1, dtype=s.dtype, device=s.device)
        below = torch.nonzero(suffix_mean < self.tau).flatten()
        k = int(below[0]) if below.numel() else n
        if k == 0:
            return valid, None, None, {"m2_before": before, "m2_after": before}
        keep = m2 < s[k - 1].to(m2.device)
        kept = s[s < s[k - 1]]
        after = kept.sum() / max(kept.numel(), 1)
        return keep, None, None, {"m2_before": before, "m2_after": after}


# --- per minibatch (need pi_theta) ----------------------------------------------------------------

def _covariance(logp: Tensor, adv: Tensor, valid: Tensor) -> Tensor:
    """``cov_t = (A_t - mean A)(log pi_t - mean log pi)`` over the valid tokens (arXiv 2505.22617
    eq. 6); 0 on padding. ``log pi`` is detached: the covariance only selects tokens."""
    m = valid.to(adv.dtype)
    lp = _masked(logp, valid).to(adv.dtype)  # [N, T]
    n = m.sum().clamp(min=1)
    cov = (adv - (adv * m).sum() / n) * (lp - (lp * m).sum() / n)  # [N, T]
    return cov * m


@MASKS.register("clip_cov")
class ClipCovMask(TokenMask):
    """Clip-Cov (Cui et al., arXiv 2505.22617 §4): detach (zero the loss and gradient of) a random
    ``ratio`` fraction of the valid tokens, ``max(int(ratio * n), 1)``, drawn among those with
    ``lb < cov_t < ub`` that the clip has not already clipped (the clip strategy's ``region``
    flag), as the authors' verl ``clip_cov`` does (ratio 2e-4, lb 1, ub 5). Per minibatch: the
    covariance needs pi_theta. ``generator``: a seeded CPU ``torch.Generator`` from the training
    loop; without one the mask uses its own, seeded with ``seed``."""

    per_rollout = False
    requires = ("logp", "advantages")

    def __init__(self, ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0, seed: int = 0) -> None:
        self.ratio = check_range("ratio", ratio, low=0.0, high=1.0, low_inclusive=False)
        self.lb = check_range("lb", lb)
        self.ub = check_range("ub", ub, low=self.lb, low_inclusive=False)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def _gen(self, given: torch.Generator | None) -> torch.Generator:
        if given is not None:
            return given
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def _apply(self, inp, valid, adv):
        cov = _covariance(inp.logp, adv, valid)  # [N, T]
        cand = valid & (cov > self.lb) & (cov < self.ub)  # [N, T]
        if inp.clip_flags is not None and "region" in inp.clip_flags:
            cand = cand & ~inp.clip_flags["region"].bool()
        n = int(valid.sum())
        idx = torch.nonzero(cand.flatten()).flatten()  # candidate positions
        num = min(max(int(self.ratio * n), 1), idx.numel()) if n else 0
        perm = torch.randperm(idx.numel(), generator=self._gen(inp.generator))[:num].to(idx.device)
        drop = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
        drop[idx[perm]] = True
        return valid & ~drop.view_as(valid), None, None, {}


@MASKS.register("kl_cov")
class KLCovPenalty(TokenMask):
    """KL-Cov (Cui et al., arXiv 2505.22617 §4): a penalty ``coef * |log pi_theta - log pi_old|``
    on the ``max(int(ratio * n), 1)`` valid tokens with the largest covariance ``cov_t``. It is a
    loss term, not a mask: ``keep`` is every valid token and ``penalty`` ``[N, T]`` is added to the
    per-token policy loss (as verl's ``kl_cov`` replaces those tokens' loss by ``-A r + coef |log r|``;
    the paper pairs it with the unclipped ``-A r``: use ``clip: none``). Defaults: the authors'
    7B recipe, ratio 2e-3, coef 1. ``mask/kl_cov_frac`` is the penalised fraction. Per minibatch."""

    per_rollout = False
    requires = ("logp", "old_logp", "advantages")

    def __init__(self, ratio: float = 2e-3, coef: float = 1.0, max_log_ratio: float = 20.0) -> None:
        self.ratio = check_range("ratio", ratio, low=0.0, high=1.0, low_inclusive=False)
        self.coef = check_range("coef", coef, low=0.0)
        self.max_log_ratio = check_range("max_log_ratio", max_log_ratio, low=0.0, low_inclusive=False)

    def _apply(self, inp, valid, adv):
        cov = _covariance(inp.logp, adv, valid)  # [N, T]
        n = int(valid.sum())
        k = min(max(int(self.ratio * n), 1), n) if n else 0
        vals = torch.where(valid, cov, torch.full_like(cov, -math.inf)).flatten()
        sel = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
        sel[torch.topk(vals, k).indices] = True
        sel = sel.view_as(valid) & valid  # [N, T]
        lp = torch.where(valid, as_float(inp.logp), 0.0)  # [N, T] with its gradient
        log_r = (lp - _masked(inp.old_logp, valid).to(lp.dtype)).clamp(-self.max_log_ratio, self.max_log_ratio)
        penalty = torch.where(sel, self.coef * log_r.abs(), torch.zeros_like(log_r))  # [N, T]
        m = valid.to(penalty.dtype)
        return valid, penalty, sel, {"penalty": (penalty.detach() * m).sum() / m.sum().clamp(min=1)}


@MASKS.register("opsm")
class OPSMMask(TokenMask):
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556 eq. 9): drop a sequence whose
    advantage is negative and whose ``mean_t(log mu - log pi_theta) > delta``. ``mu`` is
    ``sampler_logp`` when given, else ``old_logp`` (as TRL ``off_policy_mask_threshold`` does).
    A sequence's advantage is the mean of its tokens' advantages. Per minibatch (needs pi_theta,
    detached); the dropped sequences keep their place in the normaliser (slime, TRL).
    ``delta``: slime's default ``--opsm-delta`` 1e-4 (TRL's docstring suggests 0.5)."""

    per_rollout = False
    requires = ("logp", "advantages")

    def __init__(self, delta: float = 1e-4) -> None:
        self.delta = check_range("delta", delta)

    def _apply(self, inp, valid, adv):
        ref = inp.sampler_logp if inp.sampler_logp is not None else inp.old_logp
        if ref is None:
            raise ValueError(f"the {self.name!r} mask (opsm) needs sampler_logp (or old_logp)")
        m = valid.to(adv.dtype)
        lens = m.sum(-1).clamp(min=1)  # [N]
        diff = _masked(ref, valid).to(adv.dtype) - _masked(inp.logp, valid).to(adv.dtype)  # [N, T]
        seq_kl = (diff * m).sum(-1) / lens  # [N]
        seq_adv = (adv * m).sum(-1) / lens  # [N]
        drop = (seq_adv < 0) & (seq_kl > self.delta)  # [N]
        return valid & ~drop[:, None], None, None, {}


def build_masks(masks: Any) -> dict[str, TokenMask]:
    """Normalise a ``masks`` argument to ``{name: TokenMask}``: None / a dict of ``name ->`` mask
    object, registered name or ``{"name": registered name, **params}`` / a list of mask objects
    or registered names (named by their registered names). A dict value of None is skipped."""
    if masks is None:
        return {}
    if isinstance(masks, TokenMask):
        masks = [masks]
    items = masks.items() if hasattr(masks, "items") else [(None, m) for m in masks]
    out: dict[str, TokenMask] = {}
    for key, spec in items:
        if spec is None:
            continue
        if isinstance(spec, str):
            obj = MASKS.build(spec)
        elif isinstance(spec, TokenMask):
            obj = spec
        elif hasattr(spec, "items"):
            params = dict(spec)
            obj = MASKS.build(params.pop("name", key), **params)
        else:
            raise ValueError(f"masks entry {key!r}: expected a TokenMask, a registered name or a dict, got {spec!r}")
        name = str(key) if key is not None else obj.registered_name
        if name in out:
            raise ValueError(f"masks: the name {name!r} is used twice")
        obj.name = name
        out[name] = obj
    return out
