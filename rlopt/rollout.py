"""Rollout engines: sample G completions per prompt from the policy.

    engine = HFGenerate(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16)
    ro = engine.generate(model, prompt_ids, prompt_mask, num_samples=4,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ro.completion_ids      # [N*4, T], rows g*4 .. g*4+3 belong to prompt g

The module only talks to this interface, so a faster engine (a lean KV-cache sampler, vLLM)
can replace ``generate`` without touching it. Training log-probs are computed with the same
temperature; top-p / top-k truncation is not reflected in them (as in TRL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .algorithms.registry import check_range


@dataclass
class Rollout:
    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T] right-padded with pad_token_id
    completion_mask: Tensor  # [N, T] 1 on sampled tokens up to and including the first EOS
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [N, P+T]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)  # [N, P+T]

    def select(self, idx: Tensor) -> "Rollout":
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.truncated[idx])


def completion_mask_from(ids: Tensor, eos_token_id: int | list[int] | None) -> tuple[Tensor, Tensor]:
    """Mask of tokens up to and including the first EOS, and whether no EOS was produced."""
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.zeros_like(ids, dtype=torch.bool)  # [N, T]
    for e in eos:
        is_eos |= ids == e
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # [N, T] EOS count strictly before t
    return (before == 0).long(), ~is_eos.any(dim=1)


class RolloutEngine:
    """Interface: ``generate(model, prompt_ids, prompt_mask, num_samples, eos_token_id, pad_token_id, greedy)``.

    With sharded weights (FSDP / FSDP2, more than one rank) the module also passes
    ``synced_gpus=True``: every forward is then a collective, so all ranks must keep stepping
    until every rank is done (a rank that stops early would leave the others waiting forever)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 16) -> None:
        self.temperature = check_range("rollout.temperature", temperature, low=0.0, low_inclusive=False)
        self.top_p = check_range("rollout.top_p", top_p, low=0.0, high=1.0, low_inclusive=False)
        self.top_k = int(check_range("rollout.top_k", top_k, low=0))
        self.max_new_tokens = int(check_range("rollout.max_new_tokens", max_new_tokens, low=1))

    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
                 eos_token_id, pad_token_id: int, greedy: bool = False, synced_gpus: bool = False) -> Rollout:
        raise NotImplementedError


class HFGenerate(RolloutEngine):
    """Sampling with transformers' ``model.generate``."""

    @torch.no_grad()
    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
                 eos_token_id, pad_token_id: int, greedy: bool = False, synced_gpus: bool = False) -> Rollout:
        ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
        mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
                                 synced_gpus=synced_gpus, **kwargs)
        finally:
            model.train(was_training)
        comp = out[:, ids.shape[1]:]  # [N, T']
        cmask, truncated = completion_mask_from(comp, eos_token_id)
        comp = torch.where(cmask.bool(), comp, torch.full_like(comp, pad_token_id))
        return Rollout(ids, mask, comp, cmask, truncated)
