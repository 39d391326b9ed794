"""Rollout engine ``hf_generate``: sampling with transformers' ``model.generate``.

    engine = HFGenerate(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16)
    out = engine.generate(model, prompt_ids, prompt_mask, num_samples=4,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

Works with any model that has ``generate`` (the fallback when ``lean`` does not apply).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Completions, RolloutEngine, completion_mask_from


class HFGenerate(RolloutEngine):
    """Sampling with transformers' ``model.generate``. The sampler's log-probs come from
    ``generate``'s processed scores (temperature, top-k, top-p applied: the distribution each token
    was drawn from); ``generate`` keeps every step's ``[N, V]`` scores until it returns, which the
    ``lean`` engine avoids."""

    @torch.no_grad()
    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
                 eos_token_id, pad_token_id: int, greedy: bool = False, synced_gpus: bool = False) -> Completions:
        ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
        mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        record = self.sampler_logp and not greedy
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
                                 synced_gpus=synced_gpus, output_scores=record, return_dict_in_generate=True,
                                 **kwargs)
        finally:
            model.train(was_training)
        comp = out.sequences[:, ids.shape[1]:]  # [N, T']
        cmask, truncated = completion_mask_from(comp, eos_token_id)
        logp = None
        if record:  # scores[t]: [N, V] processed logits of step t; finished rows emit pad (masked below)
            logp = torch.stack([torch.log_softmax(s.float(), dim=-1).gather(1, comp[:, t:t + 1]).squeeze(1)
                                for t, s in enumerate(out.scores)], dim=1)  # [N, T']
            logp = torch.where(cmask.bool(), logp, 0.0)
        comp = torch.where(cmask.bool(), comp, torch.full_like(comp, pad_token_id))
        return Completions(ids, mask, comp, cmask, truncated, logp)
