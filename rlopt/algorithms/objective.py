"""The policy objective: ratio scheme x clipping strategy x aggregation (+ KL, + entropy).

    obj = PolicyObjective(ratio="sequence", clip=PPOClip(3e-4, 4e-4), aggregation="seq_mean_token_mean")
    loss, metrics = obj(logp, old_logp, advantages, mask)        # all [N, T]

``loss = agg(clip(ratio(logp, old_logp), A)) + kl_coef * agg(kl(logp, ref_logp))
- entropy_coef * agg(entropy)``. Components may be given as objects or registered names.
Metrics are detached 0-dim tensors with namespaced keys (``clip/token_high``, ``ratio/max``,
...); token-level ones are masked means over tokens, ``clip/seq_*`` are means over non-empty
sequences of each sequence's fraction of clipped tokens.

Three policies (docs/behaviour-correction.md): the sampler ``mu`` (``sampler_logp``), the old
policy ``pi_old`` (``old_logp``) and ``pi_theta`` (``logp``). A behaviour ``correction``
(``behaviour.py``) and per-rollout token ``masks`` (``masks.py``) are computed once per rollout by
``rollout_weights``; the module passes the returned loss mask as ``mask`` (and counts the
normaliser on it) and the weight as ``behaviour_weight``, which multiplies the clipped per-token
policy loss. Per-minibatch masks (Clip-Cov, KL-Cov, OPSM) run inside ``__call__``:

    rw = obj.rollout_weights(mask, old_logp=old, sampler_logp=mu, advantages=adv, gather=all_gather)
    loss, metrics = obj(logp, old, adv, rw.mask, sampler_logp=mu, behaviour_weight=rw.weight)

``loss = agg(sg(w) * keep_step * (clip(...) + penalty)) + kl_coef * agg(kl) - entropy_coef * agg(H)``.
``kl="k3+"`` (any estimator with a ``+``): the estimator's value with the k2 gradient (verl's
straight-through ``k3+``); ``kl_is_corrected``: the per-token KL times ``pi_theta/pi_old``
(DeepSeek-V3.2, arXiv 2512.02556 §3.1; the ratio keeps its gradient unless ``kl_is_detached``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .aggregation import Aggregation
from .behaviour import BehaviourCorrection, NoCorrection
from .clipping import CLIP_FLAGS, ClipStrategy
from .kl import kl_k2
from .masks import GatherFn, MaskInputs, TokenMask, build_masks
from .ratios import RatioScheme
from .registry import (
    AGGREGATIONS, CLIPPING, CORRECTIONS, KL_ESTIMATORS, RATIOS, as_float, check_range, check_shapes,
)


class RolloutWeights(NamedTuple):
    """``PolicyObjective.rollout_weights``'s result, for the whole rollout batch."""

    mask: Tensor  # [N, T] the loss mask: count the normaliser on it and pass it as ``mask``
    weight: Tensor  # [N, T] detached per-token weight: pass it as ``behaviour_weight``
    metrics: dict[str, Tensor]  # correction/... and mask/... of the per-rollout components


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _masked_extreme(x: Tensor, mask: Tensor, largest: bool) -> Tensor:
    fill = torch.finfo(x.dtype).min if largest else torch.finfo(x.dtype).max
    vals = torch.where(mask.bool(), x, torch.full_like(x, fill))
    ext = vals.max() if largest else vals.min()
    return torch.where(mask.bool().any(), ext, torch.ones_like(ext))  # 1.0 for an empty batch


class PolicyObjective:
    """Composes the per-token policy loss and reduces it to a scalar. Returns ``(loss, metrics)``."""

    def __init__(self, ratio: RatioScheme | str = "token", clip: ClipStrategy | str = "ppo",
                 aggregation: Aggregation | str = "token_mean", kl: str | None = None,
                 kl_coef: float = 0.0, entropy_coef: float = 0.0,
                 correction: BehaviourCorrection | str | dict | None = None, masks: Any = None,
                 kl_is_corrected: bool = False, kl_is_detached: bool = False) -> None:
        self.ratio = RATIOS.build(ratio) if isinstance(ratio, str) else ratio
        self.clip = CLIPPING.build(clip) if isinstance(clip, str) else clip
        self.aggregation = AGGREGATIONS.build(aggregation) if isinstance(aggregation, str) else aggregation
        self.kl_coef = check_range("kl_coef", kl_coef, low=0.0)
        self.kl = None
        self.kl_straight_through = kl is not None and kl.endswith("+")  # verl "k3+": k2 gradient
        if kl is not None:
            self.kl = KL_ESTIMATORS.get(kl[:-1] if self.kl_straight_through else kl)
        if self.kl_coef > 0 and self.kl is None:
            raise ValueError("kl_coef > 0 needs a KL estimator: set kl to one of " + ", ".join(KL_ESTIMATORS.names()))
        self.kl_name = kl
        self.kl_is_corrected = bool(kl_is_corrected)
        self.kl_is_detached = bool(kl_is_detached)
        self.entropy_coef = float(entropy_coef)
        if correction is None:
            correction = NoCorrection()
        elif isinstance(correction, str):
            correction = CORRECTIONS.build(correction)
        elif isinstance(correction, dict):
            params = dict(correction)
            correction = CORRECTIONS.build(params.pop("name"), **params)
        self.correction: BehaviourCorrection = correction
        self.masks: dict[str, TokenMask] = build_masks(masks)

    @property
    def rollout_masks(self) -> dict[str, TokenMask]:
        """The masks computed once per rollout (``rollout_weights``)."""
        return {k: m for k, m in self.masks.items() if m.per_rollout}

    @property
    def step_masks(self) -> dict[str, TokenMask]:
        """The masks computed per minibatch inside ``__call__`` (they need pi_theta)."""
        return {k: m for k, m in self.masks.items() if not m.per_rollout}

    @property
    def has_rollout_weights(self) -> bool:
        """``rollout_weights`` does something: a correction other than ``none``, or a per-rollout mask."""
        return not isinstance(self.correction, NoCorrection) or bool(self.rollout_masks)

    @property
    def needs_sampler_logp(self) -> bool:
        """The rollout engine must return the sampler's per-token log-probs ``mu``."""
        return self.correction.needs_sampler_logp or any("sampler_logp" in m.requires for m in self.masks.values())

    @property
    def needs_old_logp_pass(self) -> bool:
        """``rollout_weights`` needs pi_old (or its entropy) at collect time, even when on-policy."""
        if self.correction.replaces_old_logp:
            return False
        corr = self.correction.needs_sampler_logp
        return corr or any({"old_logp", "entropy"} & set(m.requires) for m in self.rollout_masks.values())

    @property
    def needs_rollout_entropy(self) -> bool:
        """A per-rollout mask needs the per-token entropy under pi_old (``rollout_weights(entropy=)``)."""
        return any("entropy" in m.requires for m in self.rollout_masks.values())

    @property
    def needs_truncated(self) -> bool:
        """A per-rollout mask needs ``truncated [N]`` (``rollout_weights(truncated=)``)."""
        return any("truncated" in m.requires for m in self.rollout_masks.values())

    def rollout_weights(self, mask: Tensor, old_logp: Tensor | None = None, sampler_logp: Tensor | None = None,
                        advantages: Tensor | None = None, entropy: Tensor | None = None,
                        truncated: Tensor | None = None, gather: GatherFn | None = None) -> RolloutWeights:
        """The behaviour correction and the per-rollout masks, **once per rollout** on the whole
        batch of this rank (batch statistics over all ranks through ``gather``).

        Order: the correction (its rejected tokens leave the loss mask if it ``renormalise``s);
        then each renormalising mask, computed on that mask, removes tokens from the loss mask;
        then each other mask, computed on the resulting loss mask, zeroes the weight. Returns the
        loss mask ``[N, T]`` (the normaliser is counted on it), the detached weight ``[N, T]`` (0
        outside the loss mask) and the metrics.
        """
        if self.correction.replaces_old_logp:
            old_logp = sampler_logp
        weight, keep, metrics = self.correction.weights(old_logp, sampler_logp, mask)  # [N, T] x2
        valid = mask != 0  # [N, T]
        loss_mask = valid & keep if self.correction.renormalise else valid
        weight = torch.where(keep, weight, torch.zeros_like(weight))
        rollout = list(self.rollout_masks.values())
        base = loss_mask
        for renormalising in (True, False):
            for mk in (m for m in rollout if m.renormalise == renormalising):
                res = mk(MaskInputs(mask=base if renormalising else loss_mask, advantages=advantages,
                                    old_logp=old_logp, sampler_logp=sampler_logp, entropy=entropy,
                                    truncated=truncated, gather=gather))
                metrics.update(res.metrics)
                if renormalising:
                    loss_mask = loss_mask & res.keep
                else:
                    weight = torch.where(res.keep, weight, torch.zeros_like(weight))
        weight = torch.where(loss_mask, weight, torch.zeros_like(weight)).detach()  # [N, T]
        out_dtype = mask.dtype if mask.dtype.is_floating_point else torch.float32
        return RolloutWeights(loss_mask.to(out_dtype), weight, metrics)

    @property
    def needs_reference(self) -> bool:
        return self.kl is not None and self.kl_coef > 0

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 ref_logp: Tensor | None = None, entropy: Tensor | None = None,
                 normalizer: Tensor | float | None = None, sampler_logp: Tensor | None = None,
                 behaviour_weight: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one (mini)batch. ``sampler_logp`` ``[N, T]``: mu (bypass: it replaces
        ``old_logp``, which may then be None; OPSM reads it). ``behaviour_weight`` ``[N, T]``: the
        ``rollout_weights(...).weight`` rows of this batch, detached, multiplying the clipped
        per-token policy loss. ``generator``: a CPU generator for Clip-Cov's random choice."""
        if self.correction.replaces_old_logp and sampler_logp is not None:
            old_logp = sampler_logp  # bypass: pi_old := mu
        if old_logp is None:
            raise ValueError("old_logp is None: pass old_logp (or sampler_logp with the 'bypass' correction)")
        check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                     ref_logp=ref_logp, entropy=entropy, sampler_logp=sampler_logp,
                     behaviour_weight=behaviour_weight)
        keep = mask != 0  # padding may hold anything, even inf/NaN: zero it before any math
        logp = torch.where(keep, logp, 0.0)
        ref_logp = None if ref_logp is None else torch.where(keep, ref_logp, 0.0)
        entropy = None if entropy is None else torch.where(keep, as_float(entropy), 0.0)
        m = mask.float()  # [N, T]
        adv = torch.where(keep, as_float(advantages), 0.0).detach()  # [N, T]
        ratio, log_ratio = self.ratio(logp, old_logp, m)  # [N, T], [N, T]
        loss_tok, flags = self.clip(ratio, adv, log_ratio, **(dict(logp=logp, old_logp=old_logp, mask=m) if getattr(self.clip, "needs_logp", False) else {}))  # [N, T], {k: [N, T] bool}
        step_metrics: dict[str, Tensor] = {}
        if self.step_masks:  # per minibatch: gradient-stopping masks, the normaliser unchanged
            inp = MaskInputs(mask=m, advantages=adv, old_logp=old_logp, sampler_logp=sampler_logp,
                             logp=logp, clip_flags=flags, generator=generator)
            for mk in self.step_masks.values():
                res = mk(inp)
                if res.penalty is not None:  # KL-Cov
                    loss_tok = loss_tok + res.penalty.to(loss_tok.dtype)  # [N, T]
                loss_tok = torch.where(res.keep, loss_tok, torch.zeros_like(loss_tok))  # [N, T]
                step_metrics.update(res.metrics)
        if behaviour_weight is not None:  # the rollout's correction x masks, after the clip
            bw = torch.where(keep, as_float(behaviour_weight).detach(), 0.0)  # [N, T]
            loss_tok = loss_tok * bw.to(loss_tok.dtype)  # [N, T]
        policy_loss = self.aggregation(loss_tok, m, normalizer)
        loss = policy_loss
        metrics: dict[str, Tensor] = {"loss/policy": policy_loss.detach(), **step_metrics}
        if self.kl is not None and ref_logp is not None:
            kl_tok = self.kl(logp, ref_logp)  # [N, T]
            if self.kl_straight_through:  # value of the estimator, gradient of k2
                k2 = kl_k2(logp, ref_logp)  # [N, T]
                kl_tok = k2 + (kl_tok - k2).detach()
            if self.kl_is_corrected:  # x pi_theta/pi_old per token (DeepSeek-V3.2)
                old = torch.where(keep, as_float(old_logp), 0.0).detach()  # [N, T]
                lr = (as_float(logp) - old).clamp(-self.ratio.max_log_ratio, self.ratio.max_log_ratio)
                tok_ratio = torch.exp(lr * keep)  # [N, T]
                kl_tok = kl_tok * (tok_ratio.detach() if self.kl_is_detached else tok_ratio)
            kl_loss = self.aggregation(kl_tok, m, normalizer)
            if self.kl_coef > 0:
                loss = loss + self.kl_coef * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
            metrics["kl/mean"] = masked_mean(kl_tok.detach(), m)
        elif self.needs_reference:
            raise ValueError("kl_coef > 0 but ref_logp was not given")
        if entropy is not None:
            ent_loss = self.aggregation(as_float(entropy), m, normalizer)
            if self.entropy_coef != 0:
                loss = loss - self.entropy_coef * ent_loss
            metrics["entropy/mean"] = masked_mean(as_float(entropy.detach()), m)
        metrics["loss/total"] = loss.detach()
        metrics.update(clip_metrics(flags, m))
        with torch.no_grad():
            r = ratio.detach()
            metrics["ratio/mean"] = masked_mean(r, m)
            metrics["ratio/min"] = _masked_extreme(r, m, largest=False)
            metrics["ratio/max"] = _masked_extreme(r, m, largest=True)
            metrics["advantage/mean"] = masked_mean(adv, m)
            metrics["advantage/std"] = (masked_mean(adv ** 2, m) - metrics["advantage/mean"] ** 2).clamp(min=0).sqrt()
        return loss, metrics

    def __repr__(self) -> str:
        return (f"PolicyObjective(ratio={self.ratio!r}, clip={self.clip!r}, aggregation={self.aggregation!r}, "
                f"kl={self.kl_name!r}, kl_coef={self.kl_coef}, entropy_coef={self.entropy_coef}, "
                f"correction={self.correction!r}, masks={self.masks!r}, kl_is_corrected={self.kl_is_corrected})")


@torch.no_grad()
def clip_metrics(flags: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """Clip fractions per token (masked mean) and per sequence (mean over non-empty sequences)."""
    m = mask.float()  # [N, T]
    lens = m.sum(-1)  # [N]
    nonempty = (lens > 0).float()  # [N]
    out = {}
    for name in CLIP_FLAGS:
        f = flags[name].float() * m  # [N, T]
        out[f"clip/token_{name}"] = f.sum() / m.sum().clamp(min=1)
        per_seq = f.sum(-1) / lens.clamp(min=1)  # [N]
        out[f"clip/seq_{name}"] = (per_seq * nonempty).sum() / nonempty.sum().clamp(min=1)
    return out
