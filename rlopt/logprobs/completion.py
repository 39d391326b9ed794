"""Log-probs of sampled completions under a model: the forward that the update and the old /
reference passes share.

    lp = CompletionLogProbs(temperature=1.0, share_prompt=True)
    logp, entropy = lp(model, completions, with_entropy=True)      # [n, T], [n, T]

Picks the forward. With ``share_prompt`` each distinct prompt runs once for its G completions:
packed (packed.py: the prompt and its completions in one row under a tree attention mask, no
padding at all; SDPA models, ``pack``) or else through a shared KV cache (shared_prompt.py);
otherwise, and under FSDP, one plain forward over ``[prompt + completion]``. Then the full LM
head or the chunked one (algorithms/lm_head.py: never the whole ``[n, T, V]`` logits). Columns
that are padding in every row are not computed (``trim_padding``); their log-probs are 0, which
every objective masks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..algorithms import token_logprobs
from ..algorithms.lm_head import auto_chunk_rows, chunked_lm_head_logprobs, saved_rows_for, split_causal_lm
from ..algorithms.registry import check_range
from ..rollout.base import Completions
from .packed import PackLayout, pack_layout, packed_forward, supports_packing
from .shared_prompt import PromptPlan, completion_states, prompt_plan, supports_shared_prompt

PACK_ATTENTION = ("auto", "dense", "segments")


class CompletionLogProbs:
    """Log-probs ``[n, T]`` (and entropy) of the completion tokens of ``Completions``.

    Args:
        temperature: the sampling temperature (log-probs of the tempered distribution).
        share_prompt: run each distinct prompt once when the model supports it.
        pack: share the prompt by packing (one row per prompt, no padding) where the model takes a
            4D boolean mask; else through the KV cache.
        pack_max_row: longest packed row, in tokens (its attention is quadratic in it); a pass
            with a longer one uses the KV-cache forward.
        pack_attention: a packed row's attention: ``"dense"`` (SDPA over the row under its tree
            mask), ``"segments"`` (each completion against its prompt and its own prefix only:
            logprobs/segments.py) or ``"auto"`` (segments where they do under a quarter of the
            dense work: long groups).
        chunked_lm_head: log-probs from hidden states, chunked over rows, with their own backward.
        chunk_rows: rows per LM-head chunk (None: sized from the vocabulary).
        saved_mib: MiB of logits the chunked head keeps for the backward instead of recomputing.
    """

    def __init__(self, temperature: float = 1.0, share_prompt: bool = True, pack: bool = True,
                 pack_max_row: int = 2048, pack_attention: str = "auto", chunked_lm_head: bool = False,
                 chunk_rows: int | None = None, saved_mib: float = 0.0) -> None:
        self.temperature = float(temperature)
        self.share_prompt = bool(share_prompt)
        self.pack = bool(pack)
        self.pack_max_row = int(check_range("pack_max_row", pack_max_row, low=1))
        if pack_attention not in PACK_ATTENTION:
            raise ValueError(f"pack_attention={pack_attention!r} is not valid; valid choices: {', '.join(PACK_ATTENTION)}")
        self.pack_attention = pack_attention
        self.chunked_lm_head = bool(chunked_lm_head)
        self.chunk_rows = chunk_rows
        self.saved_mib = float(check_range("lm_head_saved_mib", saved_mib, low=0.0))
        self._support: dict[int, tuple[bool, bool]] = {}  # per model: (packing, KV-cache sharing) apply

    def _supports(self, model: torch.nn.Module) -> tuple[bool, bool]:
        if id(model) not in self._support:
            from ..distributed import unwrap

            base = unwrap(model)
            self._support[id(model)] = (self.pack and supports_packing(base), supports_shared_prompt(base))
        return self._support[id(model)]

    def plan(self, model: torch.nn.Module, ro: Completions, sharded: bool = False) -> PromptPlan | None:
        """Which rows share a prompt, when a shared-prompt forward applies: ``share_prompt`` on,
        unsharded weights (FSDP's per-forward collectives are left alone) and a model that packs
        or ``supports_shared_prompt`` (checked once per model)."""
        if not self.share_prompt or sharded or not any(self._supports(model)):
            return None
        return prompt_plan(ro.prompt_ids, ro.prompt_mask)

    def layout(self, model: torch.nn.Module, ro: Completions, plan: PromptPlan | None) -> PackLayout | None:
        """The packed layout of this pass, or None for the KV-cache / plain forward."""
        if plan is None or not self._supports(model)[0]:
            return None
        attention = self.pack_attention
        if attention != "dense" and getattr(model, "is_gradient_checkpointing", False):
            # the blocks recompute their forward in the backward, outside the segment attention
            if attention == "segments":
                raise ValueError("pack_attention=segments cannot be combined with gradient checkpointing (the "
                                 "blocks recompute their forward in the backward, outside it): use auto or dense")
            attention = "dense"
        return pack_layout(ro, plan, self.pack_max_row, attention)

    def __call__(self, model: torch.nn.Module, ro: Completions, with_entropy: bool = False,
                 sharded: bool = False) -> tuple[Tensor, Tensor | None]:
        t = ro.completion_ids.shape[1]
        ro = trim_padding(ro)
        logp, ent = self._forward(model, ro, with_entropy, self.plan(model, ro, sharded))  # [n, T'] each
        if ro.completion_ids.shape[1] < t:
            pad = (0, t - ro.completion_ids.shape[1])
            logp, ent = F.pad(logp, pad), None if ent is None else F.pad(ent, pad)
        return logp, ent  # [n, T], [n, T] | None

    def _forward(self, model: torch.nn.Module, ro: Completions, with_entropy: bool, plan: PromptPlan | None
                 ) -> tuple[Tensor, Tensor | None]:
        layout = self.layout(model, ro, plan)
        if layout is None and plan is not None and not self._supports(model)[1]:
            plan = None  # a row too long to pack, and no KV-cache sharing: the plain forward
        if self.chunked_lm_head:  # pad positions get 0 (every objective masks them)
            decoder, weight, bias = split_causal_lm(model)
            hid = (packed_forward(decoder, ro, layout, hidden=True) if layout is not None
                   else completion_states(decoder, ro, plan, hidden=True))  # [n, T, H]
            rows = self.chunk_rows or auto_chunk_rows(weight.shape[0])
            saved = saved_rows_for(weight.shape[0], self.saved_mib, weight.dtype)
            out = chunked_lm_head_logprobs(hid, weight, ro.completion_ids, bias, self.temperature,
                                           chunk_rows=rows, return_entropy=with_entropy, mask=ro.completion_mask,
                                           saved_rows=saved)
            return out if with_entropy else (out, None)
        logits = packed_forward(model, ro, layout) if layout is not None else completion_states(model, ro, plan)  # [n, T, V]
        if with_entropy:
            return token_logprobs(logits, ro.completion_ids, self.temperature, return_entropy=True)
        return token_logprobs(logits, ro.completion_ids, self.temperature), None


def trim_padding(ro: Completions) -> Completions:
    """``ro`` without the columns that are padding in every row: the left-padding columns before
    the longest prompt and the completion columns after the longest completion."""
    lead = int((ro.prompt_mask.sum(0) == 0).long().cumprod(0).sum())  # all-pad prompt columns
    used = ro.completion_mask.sum(0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1  # completion columns any row uses
    if lead == 0 and width == ro.completion_ids.shape[1]:
        return ro
    return dataclasses.replace(ro, prompt_ids=ro.prompt_ids[:, lead:], prompt_mask=ro.prompt_mask[:, lead:],
                               completion_ids=ro.completion_ids[:, :width],
                               completion_mask=ro.completion_mask[:, :width])


def by_length(rows: Tensor, ro: Completions, micro: int, group_size: int = 1) -> Tensor:
    """With gradient accumulation (micro-batches smaller than the minibatch), order the rows by
    length so that each micro-batch holds similar lengths and ``trim_padding`` drops more
    columns. With ``group_size`` G > 1 the rows of a group (rows ``j // G``, one prompt) stay
    together, ordered by the group's total length, so that a micro-batch holds whole groups and
    the shared-prompt forward runs each prompt once. The accumulated gradient is the same sum,
    in another order."""
    if micro >= rows.numel():
        return rows
    lengths = ro.prompt_mask[rows].sum(-1) + ro.completion_mask[rows].sum(-1)  # [n]
    order = torch.sort(lengths, stable=True).indices
    if group_size > 1:
        gid = rows // group_size  # [n]
        order = order[torch.sort(gid[order], stable=True).indices]  # groups contiguous, by length inside
        total = torch.zeros(int(gid.max()) + 1, dtype=lengths.dtype, device=lengths.device).index_add_(0, gid, lengths)
        order = order[torch.sort(total[gid[order]], stable=True).indices]  # groups by total length
    return rows[order]
