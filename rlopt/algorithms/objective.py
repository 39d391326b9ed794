"""The policy objective: ratio scheme x clipping strategy x aggregation (+ KL, + entropy).

    obj = PolicyObjective(ratio="sequence", clip=PPOClip(3e-4, 4e-4), aggregation="seq_mean_token_mean")
    loss, metrics = obj(logp, old_logp, advantages, mask)        # all [N, T]

``loss = agg(clip(ratio(logp, old_logp), A)) + kl_coef * agg(kl(logp, ref_logp))
- entropy_coef * agg(entropy)``. Components may be given as objects or registered names.
Metrics are detached 0-dim tensors with namespaced keys (``clip/token_high``, ``ratio/max``,
...); token-level ones are masked means over tokens, ``clip/seq_*`` are means over non-empty
sequences of each sequence's fraction of clipped tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import Aggregation
from .clipping import CLIP_FLAGS, ClipStrategy
from .ratios import RatioScheme
from .registry import AGGREGATIONS, CLIPPING, KL_ESTIMATORS, RATIOS, as_float, check_range, check_shapes


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
                 kl_coef: float = 0.0, entropy_coef: float = 0.0) -> None:
        self.ratio = RATIOS.build(ratio) if isinstance(ratio, str) else ratio
        self.clip = CLIPPING.build(clip) if isinstance(clip, str) else clip
        self.aggregation = AGGREGATIONS.build(aggregation) if isinstance(aggregation, str) else aggregation
        self.kl_coef = check_range("kl_coef", kl_coef, low=0.0)
        self.kl = None
        if kl is not None:
            self.kl = KL_ESTIMATORS.get(kl)
        if self.kl_coef > 0 and self.kl is None:
            raise ValueError("kl_coef > 0 needs a KL estimator: set kl to one of " + ", ".join(KL_ESTIMATORS.names()))
        self.kl_name = kl
        self.entropy_coef = float(entropy_coef)

    @property
    def needs_reference(self) -> bool:
        return self.kl is not None and self.kl_coef > 0

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 ref_logp: Tensor | None = None, entropy: Tensor | None = None,
                 normalizer: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                     ref_logp=ref_logp, entropy=entropy)
        keep = mask != 0  # padding may hold anything, even inf/NaN: zero it before any math
        logp = torch.where(keep, logp, 0.0)
        ref_logp = None if ref_logp is None else torch.where(keep, ref_logp, 0.0)
        entropy = None if entropy is None else torch.where(keep, as_float(entropy), 0.0)
        m = mask.float()  # [N, T]
        adv = torch.where(keep, as_float(advantages), 0.0).detach()  # [N, T]
        ratio, log_ratio = self.ratio(logp, old_logp, m)  # [N, T], [N, T]
        loss_tok, flags = self.clip(ratio, adv, log_ratio)  # [N, T], {k: [N, T] bool}
        policy_loss = self.aggregation(loss_tok, m, normalizer)
        loss = policy_loss
        metrics: dict[str, Tensor] = {"loss/policy": policy_loss.detach()}
        if self.kl is not None and ref_logp is not None:
            kl_tok = self.kl(logp, ref_logp)  # [N, T]
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
                f"kl={self.kl_name!r}, kl_coef={self.kl_coef}, entropy_coef={self.entropy_coef})")


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
