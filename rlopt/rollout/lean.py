"""Rollout engine ``lean``: a plain sampling loop over the model's KV cache (the default).

    engine = KVCacheSampler(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64)
    ro = engine.generate(model, prompt_ids, prompt_mask, num_samples=8,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

``configs/rollout/lean.yaml`` selects it (``rlopt-train rollout=lean``). It samples from the
same distribution as ``model.generate`` (``HFGenerate``) and, on the same random state, draws
the very same tokens: per step it takes the last position's logits in float32, applies
temperature, then top-k, then top-p (the order and the tie / minimum-one-token rules of
transformers' sampling warpers), takes ``softmax`` and one ``torch.multinomial`` over all rows
``[N, V]`` (finished rows too, as ``generate`` does, so the random stream advances alike);
finished rows emit the pad token. What it leaves out is ``generate``'s machinery: the generation
config, the processor and stopping-criteria lists, per-step input preparation and mask
concatenation. The attention mask is one preallocated ``[N, P + max_new_tokens]`` buffer, the
positions come from the mask (left padding), the tokens go into a preallocated ``[N, T]``
buffer, and the only host synchronisation per step is the all-rows-finished check.

The KV cache (``cache="buffer"``, default) is transformers' ``DynamicCache`` with each layer
writing into one preallocated ``[N, heads, P + max_new_tokens, d]`` buffer and attending over a
view of the filled prefix: the stock ``DynamicCache`` concatenates (copies) the whole cache every
step, which measured ~24% of a 14M-parameter model's sampling time on this CPU. Rows that have
finished are dropped from the forward passes (``prune_finished``), without changing the random
stream. The G samples of a prompt share its prefill (``share_prefill``) and, where it pays, read
its cache once in every decode step instead of G repeated copies (``prefix_attention``,
prefix_cache.py). ``cache="dynamic"`` / ``"static"`` select the stock caches (measured in
docs/performance.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..logprobs.segments import attention_function
from ..logprobs.shared_prompt import takes_4d_bool_mask, takes_cache
from . import prefix_cache
from .base import Completions, RolloutEngine, completion_mask_from


def _eos_tensor(eos_token_id, device: torch.device) -> Tensor:
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    return torch.tensor(eos, dtype=torch.long, device=device)


def warp_logits(scores: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p on float32 ``[N, V]`` scores (filtered -> -inf).

    top-k keeps every token whose score is >= the k-th largest (ties kept); top-p sorts the
    scores ascending, and drops the tokens whose cumulative probability is <= 1 - top_p, always
    keeping the most likely one. Same rules as transformers' warpers, so ``generate`` and this
    sampler give bitwise equal probabilities."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k > 0:
        k = min(int(top_k), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)  # ascending
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        drop_sorted = cum <= (1.0 - top_p)
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _buffer_layer_class():
    from transformers import DynamicLayer

    class BufferLayer(_BufferLayerMixin, DynamicLayer):
        pass

    return BufferLayer


class _BufferLayerMixin:
    """One layer's keys and values in a preallocated ``[B, heads, capacity, d]`` buffer: ``update``
    writes the new positions in place and returns views of the filled prefix (no concatenation:
    a growing ``DynamicCache`` copies the whole cache every step)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = int(capacity), 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self.kbuf = key_states.new_empty(b, h, self.capacity, d)
            self.vbuf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.device, self.is_initialized = key_states.device, True
        end = self.length + key_states.shape[-2]
        self.kbuf[:, :, self.length:end].copy_(key_states)
        self.vbuf[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
        return self.keys, self.values

    def keep_rows(self, idx: Tensor) -> None:
        """Keep rows ``idx`` of the buffer, in that order: dropping finished rows (pruning) or
        repeating a prompt's rows for its samples (shared prefill); the filled prefix is copied
        into a new buffer of ``len(idx)`` rows."""
        kb = self.kbuf.new_empty((idx.numel(),) + self.kbuf.shape[1:])
        vb = self.vbuf.new_empty((idx.numel(),) + self.vbuf.shape[1:])
        kb[:, :, :self.length].copy_(self.kbuf[idx, :, :self.length])
        vb[:, :, :self.length].copy_(self.vbuf[idx, :, :self.length])
        self.kbuf, self.vbuf = kb, vb
        self.keys, self.values = kb[:, :, :self.length], vb[:, :, :self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


class KVCacheSampler(RolloutEngine):
    """Sampling loop with the model's KV cache; same interface and distribution as ``HFGenerate``.

    ``cache``: ``"buffer"`` (default: transformers' ``DynamicCache`` whose layers write into a
    preallocated buffer), ``"dynamic"`` (the stock growing ``DynamicCache``) or ``"static"``
    (``StaticCache``). ``prune_finished``: once at most ``prune_below`` of the rows in the
    batch are unfinished, the finished rows are dropped from the forward passes and the cache
    (buffer cache only), so the remaining steps cost in proportion to the rows still sampling.
    The random stream is unchanged by it (one multinomial over all ``[N, V]`` rows per step,
    finished rows keeping their last probabilities). ``share_prefill`` (buffer cache): each
    distinct prompt's prefill runs once and its cache rows are repeated for its ``num_samples``
    samples. ``prefix_attention`` (buffer cache, shared prefill): ``"shared"`` keeps each prompt's
    cache once and its samples' decode steps attend to it through prefix_cache.attend; ``"repeated"``
    repeats its rows for the G samples; ``"auto"`` shares on the CPU where the repeated copy of one
    layer would reach prefix_cache.MIN_REPEATED_MIB. The tokens can differ from ``generate`` only if a smaller
    batch or the shared-prefix attention changes the logits' float rounding (it did not in the
    tests)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 16,
                 cache: str = "buffer", prune_finished: bool = True, prune_below: float = 0.75,
                 share_prefill: bool = True, prefix_attention: str = "auto", dtype: str | None = None,
                 sampler_logp: bool = True, min_new_tokens: int = 0) -> None:
        super().__init__(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, dtype=dtype,
                         sampler_logp=sampler_logp, min_new_tokens=min_new_tokens)
        if cache not in ("buffer", "dynamic", "static"):
            raise ValueError(f"rollout.cache={cache!r} is not valid; valid choices: buffer, dynamic, static")
        self.cache = cache
        self.prune_finished = bool(prune_finished)
        self.prune_below = float(prune_below)
        self.share_prefill = bool(share_prefill)
        if prefix_attention not in ("auto", "repeated", "shared"):
            raise ValueError(f"rollout.prefix_attention={prefix_attention!r} is not valid; valid choices: auto, "
                             "repeated, shared")
        self.prefix_attention = prefix_attention

    def _prefix_state(self, model, share: bool, prompt_mask: Tensor, num_samples: int, t_max: int):
        """The shared-prefix cache and its state (prefix_cache.py), or None for the repeated layout."""
        if self.prefix_attention == "repeated" or num_samples == 1:  # (one sample a prompt: nothing to share)
            return None
        if not (share and prefix_cache.fits(model)):
            if self.prefix_attention == "shared":
                raise ValueError("rollout.prefix_attention=shared needs share_prefill=true, cache=buffer "
                                 f"and a model with SDPA attention (no ALiBi, no soft-capping); "
                                 f"{type(model).__name__} here: use auto or repeated")
            return None
        if self.prefix_attention == "auto" and not prefix_cache.pays(prompt_mask, num_samples, model.config):
            return None
        return prefix_cache.prefix_cache(model, t_max, num_samples, prompt_mask)

    def _new_cache(self, model, max_len: int):
        from transformers import DynamicCache, DynamicLayer, StaticCache

        if self.cache == "static":
            return StaticCache(config=model.config, max_cache_len=max_len), False
        cache = DynamicCache(config=model.config)
        if self.cache == "dynamic" or not all(type(layer) is DynamicLayer for layer in cache.layers):
            return cache, False  # sliding-window / linear-attention layers: the stock cache
        layer_cls = _buffer_layer_class()
        cache.layers = [layer_cls(max_len) for _ in cache.layers]
        return cache, True

    @torch.no_grad()
    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
                 eos_token_id, pad_token_id: int, greedy: bool = False, synced_gpus: bool = False) -> Completions:
        if not takes_cache(model):
            raise ValueError(f"rollout=lean (KVCacheSampler) needs a transformers model whose forward takes `cache=`; "
                             f"{type(model).__name__}.forward does not: use rollout=hf_generate (model.generate)")
        ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
        mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
        n, p = ids.shape
        t_max = self.max_new_tokens
        dev = ids.device
        eos = _eos_tensor(eos_token_id, dev)
        full_mask = torch.ones(n, p + t_max, dtype=mask.dtype, device=dev)  # [N, P+T] grows by a view
        full_mask[:, :p] = mask
        # no padding at all: no mask (as generate does; attention then takes its causal fast path)
        has_pad = bool((mask == 0).any())
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [N, P]
        next_pos = pos[:, -1:] + 1  # [N, 1]
        out_ids = torch.full((n, t_max), int(pad_token_id), dtype=ids.dtype, device=dev)  # [N, T]
        out_logp = None if greedy or not self.sampler_logp else torch.zeros(n, t_max, device=dev)  # [N, T] mu
        unfinished = torch.ones(n, dtype=torch.bool, device=dev)  # [N]
        pad = torch.tensor(int(pad_token_id), dtype=ids.dtype, device=dev)
        cache, buffered = self._new_cache(model, p + t_max)
        # the G samples of a prompt share its prefill: B rows through the model, the cache rows repeated
        share = buffered and self.share_prefill and num_samples > 1
        # ... and their samples' decode steps read its cache once (no repeated rows), when that pays
        made = self._prefix_state(model, share, prompt_mask, num_samples, t_max)
        cache, state = made if made is not None else (cache, None)
        # decode steps (one query per row) under SDPA take a [N, 1, 1, P+t] boolean mask as it is (transformers
        # returns a 4D mask unchanged instead of rebuilding it every step); buffer cache: keys == the filled prefix
        # (the shared-prefix steps take no mask)
        ready = buffered and has_pad and state is None and takes_4d_bool_mask(model)
        mask4 = full_mask.bool()[:, None, None, :] if ready else None
        # synced_gpus (sharded weights, several ranks): every forward is a collective, so all ranks
        # step until every rank is done, with their full batch (no pruning)
        synced = bool(synced_gpus) and torch.distributed.is_available() and torch.distributed.is_initialized()
        prunable = buffered and self.prune_finished and not greedy and not synced
        rows = None  # indices of the rows still in the forward batch (None: all N)
        probs = None  # [N, V] last probabilities of every row (finished rows keep theirs)
        self.last_row_steps = 0  # rows x decode steps computed by the last call (pruning lowers it)
        was_training = model.training
        model.eval()
        stack = contextlib.ExitStack()  # the decode steps' attention function (shared prefix)
        try:
            if share:
                out = model(input_ids=prompt_ids, attention_mask=prompt_mask if has_pad else None,
                            position_ids=pos[::num_samples], cache=cache, use_cache=True, logits_to_keep=1)
                rep = torch.arange(prompt_ids.shape[0], device=dev).repeat_interleave(num_samples)  # [N]
                if state is None:
                    for layer in cache.layers:
                        layer.keep_rows(rep)  # [B, h, P, d] -> [N, h, P, d]
                else:  # the cache keeps [B, h, P, d]; the decode steps attend through prefix_cache.attend
                    stack.enter_context(attention_function(model, prefix_cache.NAME, prefix_cache.attend))
                logits = out.logits[:, -1].index_select(0, rep)  # [N, V]
            else:
                out = model(input_ids=ids, attention_mask=full_mask[:, :p] if has_pad else None, position_ids=pos,
                            cache=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1]  # [N, V]
            steps = 0
            for step in range(t_max):
                scores = logits.float()  # [n_rows, V]
                if step < self.min_new_tokens and eos.numel():
                    scores = scores.index_fill(1, eos, float("-inf"))  # no EOS before min_new_tokens
                if greedy:
                    tok = scores.argmax(dim=-1)
                else:
                    p_rows = warp_logits(scores, self.temperature, self.top_k, self.top_p).softmax(dim=-1)
                    if rows is None:
                        probs = p_rows
                    else:
                        probs.index_copy_(0, rows, p_rows)
                    tok = torch.multinomial(probs, num_samples=1).squeeze(1)  # [N]: one draw for every row
                    if out_logp is not None:  # [N] the log-prob of the draw, from the sampling step's own probabilities
                        out_logp[:, step] = probs.gather(1, tok[:, None]).squeeze(1).log()
                tok = torch.where(unfinished, tok, pad)
                out_ids[:, step] = tok
                steps = step + 1
                if eos.numel():
                    unfinished &= ~torch.isin(tok, eos)
                left = unfinished.sum()
                if synced:
                    torch.distributed.all_reduce(left)  # rows still sampling on all ranks
                n_left = int(left)  # the one host sync per step
                if steps == t_max or n_left == 0:
                    break
                cache = out.cache if getattr(out, "cache", None) is not None else cache
                n_rows = n if rows is None else rows.numel()
                if prunable and 0 < n_left <= self.prune_below * n_rows:
                    keep = unfinished.nonzero().squeeze(1)  # [n_left] rows of the full batch
                    local = keep if rows is None else torch.searchsorted(rows, keep)  # their place in the batch
                    for layer in cache.layers:
                        layer.keep_rows(local)
                    if rows is None:
                        probs = probs.clone()  # it aliased p_rows
                    rows = keep
                    if state is not None:
                        state.rows = rows
                self.last_row_steps += n if rows is None else rows.numel()
                step_tok = tok[:, None] if rows is None else tok[rows, None]
                step_pos = next_pos if rows is None else next_pos[rows]
                if state is not None:  # no mask: the prompts' padding is masked in prefix_cache.attend
                    out = model(input_ids=step_tok, position_ids=step_pos, cache=cache, use_cache=True,
                                logits_to_keep=1, rlopt_prefix=state)
                    if steps == 1:
                        prefix_cache.check_served(state, model)
                else:
                    src = full_mask if mask4 is None else mask4
                    step_mask = src[..., :p + steps] if rows is None else src[rows][..., :p + steps]
                    out = model(input_ids=step_tok, attention_mask=step_mask if has_pad else None,
                                position_ids=step_pos, cache=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1]
                next_pos = next_pos + 1
        finally:
            stack.close()
            model.train(was_training)
        comp = out_ids[:, :steps]  # [N, T'] (T' < T when every row stopped early, like generate)
        cmask, truncated = completion_mask_from(comp, eos_token_id)
        comp = torch.where(cmask.bool(), comp, torch.full_like(comp, pad_token_id))
        logp = None if out_logp is None else torch.where(cmask.bool(), out_logp[:, :steps], 0.0)  # [N, T']
        return Completions(ids, mask, comp, cmask, truncated, logp)
