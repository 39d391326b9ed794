"""Importance-ratio schemes: ``(logp, old_logp, mask) -> (ratio, log_ratio)``, both ``[N, T]``.

    ratio, log_ratio = SequenceRatio()(logp, old_logp, mask)    # GSPO s_i on every token of i

Log-ratios are computed in float32 (float64 stays float64) and clamped to
``[-max_log_ratio, max_log_ratio]`` before ``exp`` so nothing overflows (the clamp also stops the
gradient of a token that far off-policy). Padding positions (mask 0) get log-ratio 0, ratio 1,
whatever they hold (even inf/NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import RATIOS, Component, as_float, check_range, check_shapes


class RatioScheme(Component):
    """Base class. ``level`` is ``"token"`` or ``"sequence"`` (one value per completion)."""

    level = "token"

    def __init__(self, max_log_ratio: float = 20.0) -> None:
        self.max_log_ratio = check_range("max_log_ratio", max_log_ratio, low=0.0, low_inclusive=False)

    def log_ratio(self, logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, logp: Tensor, old_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_shapes(logp=logp, old_logp=old_logp, mask=mask)
        keep = mask != 0  # padding may hold anything, even inf/NaN: zero it before any math
        lp = torch.where(keep, as_float(logp), 0.0)
        olp = torch.where(keep, as_float(old_logp).detach(), 0.0)
        m = mask.to(torch.promote_types(lp.dtype, olp.dtype))  # [N, T]
        lr = self.log_ratio(lp, olp, m)  # [N, T]
        lr = lr.clamp(-self.max_log_ratio, self.max_log_ratio) * m  # [N, T]
        return torch.exp(lr), lr

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_log_ratio={self.max_log_ratio})"


def _seq_mean(x: Tensor, m: Tensor) -> Tensor:
    """Masked mean over T, ``[N, T] -> [N, 1]``; 0 for an empty row."""
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)


@RATIOS.register("token")
class TokenRatio(RatioScheme):
    """Per-token ratio ``r_t = pi(y_t) / pi_old(y_t)`` (PPO, GRPO)."""

    def log_ratio(self, logp: Tensor, old_logp: Tensor, m: Tensor) -> Tensor:
        return logp - old_logp  # [N, T]


@RATIOS.register("sequence")
class SequenceRatio(RatioScheme):
    """GSPO sequence ratio ``s_i = (pi(y_i)/pi_old(y_i))^(1/|y_i|)`` (arXiv 2507.18071 eq. 7),
    the geometric mean of the token ratios, broadcast to every token of the sequence."""

    level = "sequence"

    def log_ratio(self, logp: Tensor, old_logp: Tensor, m: Tensor) -> Tensor:
        return _seq_mean(logp - old_logp, m).expand_as(logp)  # [N, T]


@RATIOS.register("sequence_token")
class SequenceTokenRatio(RatioScheme):
    """GSPO-token (arXiv 2507.18071 eqs. 13-14): ``sg(log s_i) + logp_t - sg(logp_t)``.

    Its value equals the sequence ratio ``s_i``; its gradient flows through each token, so a
    per-token advantage can weight each token separately. With an advantage that is constant
    over a sequence it gives GSPO's value and gradient.
    """

    def log_ratio(self, logp: Tensor, old_logp: Tensor, m: Tensor) -> Tensor:
        seq = _seq_mean(logp - old_logp, m).detach()  # [N, 1]
        return seq + logp - logp.detach()  # [N, T]


@RATIOS.register("product")
class ProductRatio(RatioScheme):
    """Unnormalised sequence ratio ``pi(y_i)/pi_old(y_i)`` (sum of token log-ratios).

    For ablations only: its variance grows with length, which is why GSPO normalises.
    """

    level = "sequence"

    def log_ratio(self, logp: Tensor, old_logp: Tensor, m: Tensor) -> Tensor:
        return ((logp - old_logp) * m).sum(-1, keepdim=True).expand_as(logp)  # [N, T]
