"""Per-token log-probs of chosen ids without a float32 ``[N, T, V]`` log-softmax.

    logp = token_logprobs(logits, ids, temperature=0.7)              # [N, T]
    logp, ent = token_logprobs(logits, ids, return_entropy=True)     # entropy [N, T]

``log p(y) = z_y/tau - logsumexp(z/tau)``: the chosen logit is gathered and a row-wise
logsumexp subtracted, ``chunk_rows`` rows at a time, so at most one chunk of logits is ever
upcast to float32. Dividing by the sampling temperature makes the log-probs those of the
distribution that was sampled from (as TRL does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import as_float, check_range


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0, chunk_rows: int = 1024,
                   return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"shape mismatch: logits{list(logits.shape)} must be ids{list(ids.shape)} + [V]")
    tau = check_range("temperature", temperature, low=0.0, low_inclusive=False)
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)  # [R, V]
    flat_ids = ids.reshape(-1)  # [R]
    out, ents = [], []
    step = max(int(chunk_rows), 1)
    for start in range(0, flat.shape[0], step):
        z = as_float(flat[start:start + step])  # [c, V]
        if tau != 1.0:
            z = z / tau
        lse = torch.logsumexp(z, dim=-1)  # [c]
        chosen = z.gather(-1, flat_ids[start:start + step, None]).squeeze(-1)  # [c]
        out.append(chosen - lse)
        if return_entropy:
            p = torch.softmax(z, dim=-1)  # [c, V]
            ents.append(lse - (p * z).sum(-1))
    empty_dtype = torch.promote_types(flat.dtype, torch.float32)
    logp = torch.cat(out).view(ids.shape) if out else flat.new_zeros(ids.shape, dtype=empty_dtype)
    if not return_entropy:
        return logp
    ent = torch.cat(ents).view(ids.shape) if ents else torch.zeros_like(logp)
    return logp, ent
