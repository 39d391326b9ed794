"""DAPO's dynamic sampling (arXiv 2503.14476 §3.2): keep only the groups whose rewards differ,
and sample more prompts until the batch is full.

    dyn = DynamicSampling(batch_size=16, max_gen_batches=3)
    prompts, columns, ro, texts, rewards, per_fn, valid, metrics = dyn.collect(module, batch)

A group whose G rewards all (nearly) agree has zero advantage under a group baseline: it adds
no gradient but still counts in the loss normaliser. The data loader hands the module
``batch_size x max_gen_batches`` prompts a step (``train.py`` sizes it); they are sampled and
scored ``batch_size`` at a time, groups with ``std(rewards) <= min_std`` are dropped, and sampling
stops once ``batch_size`` groups passed (the extra ones are cut) or the prompts run out. Then
``on_exhausted="train"`` trains on the groups there are (``sampling/short_steps`` counts such
steps), ``"error"`` stops with an error naming the step. All ranks generate the same number of
times (sharded generation is a collective) and keep the same number of groups (the minimum over
ranks), so minibatches and normalisers stay exact. Logged: ``sampling/pass_rate`` (groups kept
/ groups sampled, before the cut), ``sampling/gen_batches``, ``reward/zero_std_groups`` (before
the filter) and ``sampling/short_steps``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import ranks
from ..algorithms.registry import check_range
from .base import Completions


class DynamicSampling:
    def __init__(self, batch_size: int, max_gen_batches: int = 3, min_std: float = 1e-6,
                 on_exhausted: str = "train") -> None:
        self.batch_size = int(check_range("data.batch_size", batch_size, low=1))
        self.max_gen_batches = int(check_range("dynamic_sampling.max_gen_batches", max_gen_batches, low=1))
        self.min_std = float(check_range("dynamic_sampling.min_std", min_std, low=0.0))
        if on_exhausted not in ("train", "error"):
            raise ValueError(f"dynamic_sampling.on_exhausted={on_exhausted!r} is not valid; valid choices: train, error")
        self.on_exhausted = on_exhausted
        self.short_steps = 0  # steps trained on fewer than batch_size groups (saved in checkpoints)

    def collect(self, module: Any, batch: dict[str, list[Any]]) -> tuple:
        g, b = module.group_size, self.batch_size
        n_prompts = len(batch["prompt"])
        parts: list[tuple] = []  # (prompt indices, completions, texts, rewards, per_fn, valid) of kept groups
        kept = sampled = zero_std = gen = 0
        for start in range(0, n_prompts, b):
            need = torch.tensor(float(kept < b), device=module.device)
            if gen and not bool(ranks.reduce_max(need)):  # every rank is full
                break
            chunk = {k: v[start:start + b] for k, v in batch.items()}
            ro, texts = module.make_completions(chunk)
            rewards, per_fn, valid = module.score(chunk["prompt"], ro, texts,
                                                  {k: v for k, v in chunk.items() if k != "prompt"}, g)
            gen += 1
            groups = len(chunk["prompt"])
            std = rewards.view(groups, g).std(-1)  # [B]
            ok = (std > self.min_std).nonzero().squeeze(1).tolist()  # passing groups of this chunk
            sampled, zero_std = sampled + groups, zero_std + (groups - len(ok))
            if kept < b and ok:
                rows = torch.tensor([q * g + j for q in ok for j in range(g)], device=rewards.device)
                parts.append(([start + q for q in ok], ro.select(rows), [texts[i] for i in rows.tolist()],
                              rewards[rows], {k: v[rows] for k, v in per_fn.items()}, valid[rows]))
                kept += len(ok)
        keep = int(ranks.reduce_min(torch.tensor(float(min(kept, b)), device=module.device)))  # equal on all ranks
        if keep < b:
            if self.on_exhausted == "error" or keep == 0:
                raise RuntimeError(f"dynamic sampling at step {module.global_step}: only {keep} of {b} groups had "
                                   f"rewards that differ after {gen} generation batches (dynamic_sampling."
                                   f"max_gen_batches={self.max_gen_batches}); raise it, or set on_exhausted=train")
            self.short_steps += 1
        idx = [i for p in parts for i in p[0]][:keep]
        ro = concat_completions([p[1] for p in parts], module.tokenizer.pad_token_id).select(
            torch.arange(keep * g, device=module.device))
        texts = [t for p in parts for t in p[2]][:keep * g]
        rewards = torch.cat([p[3] for p in parts])[:keep * g]
        per_fn = {k: torch.cat([p[4][k] for p in parts])[:keep * g] for k in parts[0][4]}
        valid = torch.cat([p[5] for p in parts])[:keep * g]
        prompts = [batch["prompt"][i] for i in idx]
        columns = {k: [v[i] for i in idx] for k, v in batch.items() if k != "prompt"}
        tot = ranks.reduce_sum(torch.tensor([float(kept), float(sampled), float(zero_std), float(gen)],
                                            device=module.device))
        metrics = {"sampling/pass_rate": tot[0] / tot[1].clamp(min=1), "reward/zero_std_groups": tot[2] / tot[1].clamp(min=1),
                   "sampling/gen_batches": tot[3] / ranks.world_size(),
                   "sampling/short_steps": torch.tensor(float(self.short_steps))}
        return prompts, columns, ro, texts, rewards, per_fn, valid, metrics

    def state_dict(self) -> dict:
        return {"short_steps": self.short_steps}

    def load_state_dict(self, state: dict) -> None:
        self.short_steps = int(state.get("short_steps", 0))


def concat_completions(parts: list[Completions], pad_token_id: int) -> Completions:
    """Rows of several ``Completions`` in one record: prompts left-padded, completions right-padded
    to the widest part (masks 0 and sampler log-probs 0 on the padding)."""
    if len(parts) == 1:
        return parts[0]
    p = max(c.prompt_ids.shape[1] for c in parts)
    t = max(c.completion_ids.shape[1] for c in parts)

    def left(x: Tensor, width: int, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x: Tensor, width: int, value: float) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    mus = [c.sampler_logp for c in parts]
    return Completions(
        prompt_ids=torch.cat([left(c.prompt_ids, p, pad_token_id) for c in parts]),  # [N, P]
        prompt_mask=torch.cat([left(c.prompt_mask, p, 0) for c in parts]),  # [N, P]
        completion_ids=torch.cat([right(c.completion_ids, t, pad_token_id) for c in parts]),  # [N, T]
        completion_mask=torch.cat([right(c.completion_mask, t, 0) for c in parts]),  # [N, T]
        truncated=torch.cat([c.truncated for c in parts]),  # [N]
        sampler_logp=None if any(m is None for m in mus) else torch.cat([right(m, t, 0.0) for m in mus]),  # [N, T]
    )
