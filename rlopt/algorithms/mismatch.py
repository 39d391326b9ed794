"""How far the sampler mu is from the trainer's pi_old, on the tokens mu drew.

    stats = mismatch_stats(old_logp, sampler_logp, mask)        # {name: (sum, count) or max}, this rank
    scalars = finish_mismatch(stats, reduce_sum, reduce_max)    # {"mismatch/kl_k1": ..., ...} over all ranks

With ``x_t = log pi_old(y_t) - log mu(y_t)`` and ``r_t = exp(x_t)`` on tokens sampled from mu
(Schulman's estimators of ``KL(mu || pi_old)``, http://joschu.net/blog/kl-approx.html):

- ``kl_k1 = E[-x]``, ``kl_k3 = E[r - 1 - x]`` (token means);
- ``logp_abs_diff_mean|max = E|x|``, ``max |x|``;
- ``ppl_ratio``: mean over sequences of ``exp(-mean_t x)`` = the sequence's perplexity under pi_old
  over its perplexity under mu;
- ``chi2_token = E[r^2] - 1`` and ``chi2_seq = E_seq[(prod_t r_t)^2] - 1``: the chi-square
  divergence, whose size sets the variance of importance weights at token and sequence level.

Every statistic is kept as a sum and a count (or a max), so the values over several ranks are
exact. ``x`` is clamped to ``[-20, 20]`` before ``exp`` (sequence sums too).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

BOUND = 20.0


@torch.no_grad()
def mismatch_stats(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor] | Tensor]:
    m = mask.double()  # [N, T]
    x = torch.where(mask != 0, old_logp.double() - sampler_logp.double(), 0.0).clamp(-BOUND, BOUND)  # [N, T]
    lens = m.sum(-1)  # [N]
    seq = lens > 0  # [N] non-empty sequences
    tokens, n_seq = m.sum(), seq.double().sum()
    x_seq = x.sum(-1)  # [N]
    return {
        "kl_k1": ((-x * m).sum(), tokens),
        "kl_k3": (((torch.expm1(x) - x) * m).sum(), tokens),
        "logp_abs_diff_mean": ((x.abs() * m).sum(), tokens),
        "logp_abs_diff_max": (x.abs() * m).max() if x.numel() else x.new_zeros(()),
        "ppl_ratio": (torch.where(seq, torch.exp(-x_seq / lens.clamp(min=1)), 0.0).sum(), n_seq),
        "chi2_token": ((torch.expm1(2 * x) * m).sum(), tokens),
        "chi2_seq": (torch.where(seq, torch.expm1(2 * x_seq.clamp(-BOUND, BOUND)), 0.0).sum(), n_seq),
    }


def finish_mismatch(stats: dict[str, tuple[Tensor, Tensor] | Tensor], reduce_sum: Callable[[Tensor], Tensor],
                    reduce_max: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``mismatch/<name>`` scalars over all ranks (sums and counts reduced, then divided)."""
    pairs = {k: v for k, v in stats.items() if isinstance(v, tuple)}
    packed = reduce_sum(torch.stack([torch.stack(v) for v in pairs.values()]))  # [K, 2]
    out = {f"mismatch/{k}": s / c.clamp(min=1) for k, (s, c) in zip(pairs, packed)}
    for k, v in stats.items():
        if not isinstance(v, tuple):
            out[f"mismatch/{k}"] = reduce_max(v)
    return {k: v.float() for k, v in out.items()}
