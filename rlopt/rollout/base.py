"""The rollout-engine interface and the record it returns.

    engine = KVCacheSampler(temperature=1.0, max_new_tokens=16)      # rlopt/rollout/lean.py
    out = engine.generate(model, prompt_ids, prompt_mask, num_samples=4,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out.completion_ids      # [B*4, T], rows g*4 .. g*4+3 belong to prompt g

An engine turns prompts into ``Completions``; the module only talks to this interface, so
another engine (``hf_generate``, ``lean``, later a remote inference server) drops in through
``configs/rollout/<name>.yaml``, whose names match the modules of this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..algorithms.registry import check_range

SAMPLER_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclass
class Completions:
    """What a rollout engine returns: G sampled completions per prompt, groups contiguous."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T] right-padded with pad_token_id
    completion_mask: Tensor  # [N, T] 1 on sampled tokens up to and including the first EOS
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    # [N, T] log-prob of each sampled token under the distribution it was drawn from (temperature,
    # top-k / top-p renormalised), from the sampling step's own logits; 0 on padding; None for greedy
    sampler_logp: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [N, P+T]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)  # [N, P+T]

    def tensors(self) -> tuple[Tensor | None, ...]:
        """Every field, in declaration order (``Completions(*c.tensors())`` rebuilds ``c``)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "Completions":
        """``fn`` applied to every tensor field (None stays None)."""
        return Completions(*(None if t is None else fn(t) for t in self.tensors()))

    def to(self, device: torch.device | str) -> "Completions":
        return self.apply(lambda t: t.to(device))

    def select(self, idx: Tensor) -> "Completions":
        return self.apply(lambda t: t[idx])


def completion_mask_from(ids: Tensor, eos_token_id: int | list[int] | None) -> tuple[Tensor, Tensor]:
    """Mask of tokens up to and including the first EOS, and whether no EOS was produced."""
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.zeros_like(ids, dtype=torch.bool)  # [N, T]
    for e in eos:
        is_eos |= ids == e
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # [N, T] EOS count strictly before t
    return (before == 0).long(), ~is_eos.any(dim=1)


class RolloutEngine:
    """Interface: ``generate(model, prompt_ids, prompt_mask, num_samples, eos_token_id, pad_token_id, greedy)``
    returns ``Completions`` with ``sampler_logp`` filled for sampled (not greedy) completions.

    ``sampler_logp`` (``rollout.sampler_logp``): record them (default); false skips the recording
    (benchmarks/sampler_logp_cost.py measures what it costs).

    ``dtype`` (``rollout.dtype``): None samples with the policy itself; ``"bfloat16"`` /
    ``"float16"`` / ``"float32"`` make the module sample with a copy of the policy's weights in
    that dtype, refreshed before every rollout step, while training stays in the policy's own
    dtype: the one-machine analogue of an inference engine whose numerics differ from the
    trainer's (docs/behaviour-correction.md).

    With sharded weights (FSDP / FSDP2, more than one rank) the module also passes
    ``synced_gpus=True``: every forward is then a collective, so all ranks must keep stepping
    until every rank is done (a rank that stops early would leave the others waiting forever).

    ``min_new_tokens`` (``rollout.min_new_tokens``, 0 = off): EOS cannot be drawn before that many
    tokens (its logit set to -inf before the temperature, as transformers'
    ``MinNewTokensLengthLogitsProcessor`` does; mu is the probability under that rule, while
    pi_theta's is not, as with top-k / top-p). ``min_new_tokens == max_new_tokens`` gives
    completions of one fixed length (benchmarks/trl_compare.py ``--fixed-length``)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 16,
                 dtype: str | None = None, sampler_logp: bool = True, min_new_tokens: int = 0) -> None:
        self.sampler_logp = bool(sampler_logp)  # record mu of each drawn token (false: skip; corrections need it)
        if dtype not in SAMPLER_DTYPES:
            raise ValueError(f"rollout.dtype={dtype!r} is not valid; valid choices: null, {', '.join(SAMPLER_DTYPES[1:])}")
        self.dtype = dtype
        self.temperature = check_range("rollout.temperature", temperature, low=0.0, low_inclusive=False)
        self.top_p = check_range("rollout.top_p", top_p, low=0.0, high=1.0, low_inclusive=False)
        self.top_k = int(check_range("rollout.top_k", top_k, low=0))
        self.max_new_tokens = int(check_range("rollout.max_new_tokens", max_new_tokens, low=1))
        self.min_new_tokens = int(check_range("rollout.min_new_tokens", min_new_tokens, low=0,
                                              high=self.max_new_tokens))

    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
                 eos_token_id, pad_token_id: int, greedy: bool = False, synced_gpus: bool = False) -> Completions:
        raise NotImplementedError


class BehaviourCopy:
    """The sampler's own weights: a copy of the policy (in ``rollout.dtype`` when set, else the
    policy's own dtype), loaded before every rollout step from the policy or from given parameters
    (stale weights, ``rollout/staleness.py``). So mu differs from pi_old by the sampler's numerics
    (the one-machine analogue of an inference engine in another precision) and/or by its weights'
    age. Not a submodule of anything: it is rebuilt from the policy, never checkpointed."""

    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype
        self.model: torch.nn.Module | None = None

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module, params: list[Tensor] | None = None) -> torch.nn.Module:
        """The copy with ``params`` (default: the policy's current parameters) loaded."""
        if self.model is None:
            import copy

            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            if self.dtype is not None:
                self.model.to(getattr(torch, self.dtype))
        for dst, src in zip(self.model.parameters(), params if params is not None else policy.parameters()):
            dst.copy_(src)
        return self.model
