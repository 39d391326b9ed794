"""Shared-prefix decode attention: the G samples of a prompt read its KV cache once, not G times.

    cache, state = prefix_cache(model, capacity=T, groups=G)   # KVCacheSampler does it
    model(input_ids=prompts, ..., cache=cache)                  # prefill: [B, Hkv, P, d] kept once
    with attention_function(model, NAME, attend):
        model(input_ids=tok, cache=cache, rlopt_prefix=state)   # decode steps

After the shared prefill (``KVCacheSampler(share_prefill=True)``), the stock layout repeats each
prompt's keys and values for its G samples, and every decode step reads all ``N = B * G`` copies:
decode attention on the CPU is bound by that read (the small model: ~2.5 ms of SDPA a layer and
step, ~30% of sampling). Here each layer keeps the prompt's cache once, ``[B, Hkv, P, d]``, and each
sample's own tokens in ``[N, Hkv, T, d]``; one decode step's attention is

    s_p = q_g K_p^T   [B, Hkv, G * r, P]   the G samples' queries (r per KV head) against their prompt
    s_c = q K_c^T     [n, Hkv, r, t]       each row against its own tokens
    a   = softmax([s_p, s_c] * scale)      one softmax over the P + t keys (padding keys -inf)
    o   = a_p V_p + a_c V_c

the same attention as over the repeated cache, computed in another order (float rounding differs:
~1e-6 in float32; the sampler tests compare in float64). This is the prefix / cascade
decomposition of Hydragen (Juravsky et al., 2024, arXiv:2402.05099) and FlashInfer's cascade
attention, written with plain matmuls. Rows dropped from the batch (``prune_finished``) keep
their slot ``s`` (prompt ``s // G``): the prompt part runs over all ``N`` slots, with zero
queries for the dropped ones.

The attention is a registered transformers attention function (``AttentionInterface``), switched
in for the decode steps only; transformers builds no mask for it (it is not a mask interface
name), and the prompt's padding is masked here. ``fits(model)`` says which models can take it:
SDPA attention, no ALiBi, no logit soft-capping, a forward that passes keywords to its
attention (checked at the first decode step: every layer must have called it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..logprobs.shared_prompt import _base, takes_4d_bool_mask

NAME = "rlopt_prefix"


def fits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s decode attention can run as shared-prefix attention: SDPA without ALiBi
    (``takes_4d_bool_mask``), no logit soft-capping, and a forward that passes keywords on."""
    try:
        params = inspect.signature(_base(model).forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return (any(p.kind is p.VAR_KEYWORD for p in params) and takes_4d_bool_mask(model)
            and getattr(model.config, "attn_logit_softcapping", None) is None)


@dataclass
class PrefixState:
    """What the attention of one generate call needs besides its arguments."""

    layers: list  # the cache's PrefixLayers, by layer index
    groups: int  # G samples per prompt
    bias: Tensor  # [B, 1, 1, P] 0 for a real prompt key, -inf for left padding
    rows: Tensor | None = None  # [n] slot (row of the full N-row batch) of each row in the forward; None: all
    calls: int = field(default=0)  # attention calls served (the first decode step checks it)


def _prefix_layer_class():
    from transformers import DynamicLayer

    class PrefixLayer(_PrefixLayerMixin, DynamicLayer):
        pass

    return PrefixLayer


class _PrefixLayerMixin:
    """One layer's cache: the prompts' keys and values once (``kp``, ``vp``: ``[B, Hkv, P, d]``, the
    prefill's), each row's own in a preallocated ``[n, Hkv, capacity, d]`` buffer; ``update``
    returns views of the filled part of the latter (the prefill: its own keys and values)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length, self.prompt_len = int(capacity), 0, 0
        self.kbuf = self.vbuf = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:  # the prefill over the B distinct prompts
            self.kp, self.vp = key_states.contiguous(), value_states.contiguous()  # [B, Hkv, P, d]
            self.prompt_len = key_states.shape[-2]
            self.device, self.is_initialized = key_states.device, True
            return key_states, value_states
        if self.kbuf is None:
            n, h, _, d = key_states.shape
            self.kbuf = key_states.new_empty(n, h, self.capacity, d)  # [N, Hkv, T, d]
            self.vbuf = value_states.new_empty(n, h, self.capacity, value_states.shape[-1])
        end = self.length + key_states.shape[-2]
        self.kbuf[:, :, self.length:end].copy_(key_states)
        self.vbuf[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.kbuf[:, :, :end], self.vbuf[:, :, :end]

    def keep_rows(self, idx: Tensor) -> None:
        """Keep rows ``idx`` of the rows' own buffer (the prompts' part is untouched; before the first
        decode step there is no buffer yet, and it will be allocated for the rows left)."""
        if self.kbuf is not None:
            self.kbuf, self.vbuf = self.kbuf[idx], self.vbuf[idx]  # advanced indexing: a copy

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.prompt_len + self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.prompt_len + self.length

    def get_max_length(self) -> int:
        return -1


def prefix_cache(model: torch.nn.Module, capacity: int, groups: int, prompt_mask: Tensor):
    """A ``DynamicCache`` of PrefixLayers (``capacity`` decode positions each) and its state, for a
    model whose cache layers are all plain ``DynamicLayer`` (the sampler's buffer cache checked it).
    ``prompt_mask``: ``[B, P]`` of the distinct prompts."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [_prefix_layer_class()(capacity) for _ in cache.layers]
    bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
    bias = bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]  # [B, 1, 1, P]
    return cache, PrefixState(cache.layers, int(groups), bias)


def attend(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
           dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The attention function of a decode step: ``query`` ``[n, H, 1, d]``, ``key`` / ``value`` the
    rows' own ``[n, Hkv, t, d]`` (the cache's ``update``); returns ``[n, 1, H, d]``."""
    st: PrefixState | None = kwargs.get("rlopt_prefix")
    if st is None:
        raise RuntimeError("shared-prefix attention called without its state (rlopt_prefix)")
    if getattr(module, "sinks", None) is not None or getattr(module, "sliding_window", None):
        raise ValueError(f"{type(module).__name__} has attention sinks or a sliding window; shared-prefix "
                         "attention does not model them: set rollout.prefix_attention=repeated")
    layer = st.layers[module.layer_idx]
    n, h, q_len, d = query.shape
    if q_len != 1:  # (several new positions would need a causal mask among themselves)
        raise ValueError(f"shared-prefix attention takes one new position a row (a decode step), got {q_len}")
    hkv = key.shape[1]
    r = h // hkv  # queries per KV head (grouped-query attention: head j * h/hkv + i reads KV head j)
    b, p = layer.kp.shape[0], layer.kp.shape[-2]
    g, slots = st.groups, b * st.groups
    scale = d ** -0.5 if scaling is None else scaling
    acc = torch.promote_types(query.dtype, torch.float32)  # scores and softmax in float32 at least
    q = query.reshape(n, hkv, r, d)  # [n, Hkv, r, d]
    q_all = q if st.rows is None else q.new_zeros(slots, hkv, r, d).index_copy_(0, st.rows, q)  # [N, Hkv, r, d]
    q_g = q_all.view(b, g, hkv, r, d).transpose(1, 2).reshape(b, hkv, g * r, d)  # [B, Hkv, G*r, d]
    s_p = torch.matmul(q_g, layer.kp.transpose(-1, -2))  # [B, Hkv, G*r, P]
    s_p = (s_p.to(acc) * scale + st.bias).view(b, hkv, g, r, p).transpose(1, 2).reshape(slots, hkv, r, p)
    if st.rows is not None:
        s_p = s_p[st.rows]  # [n, Hkv, r, P]
    s_c = torch.matmul(q, key.transpose(-1, -2)).to(acc) * scale  # [n, Hkv, r, t]
    a = torch.cat([s_p, s_c], dim=-1).softmax(dim=-1).to(query.dtype)  # [n, Hkv, r, P + t]
    a_p = a[..., :p] if st.rows is None else a.new_zeros(slots, hkv, r, p).index_copy_(0, st.rows, a[..., :p])
    a_g = a_p.reshape(b, g, hkv, r, p).transpose(1, 2).reshape(b, hkv, g * r, p)  # [B, Hkv, G*r, P]
    o_p = torch.matmul(a_g, layer.vp).view(b, hkv, g, r, d).transpose(1, 2).reshape(slots, hkv, r, d)  # [N, ...]
    if st.rows is not None:
        o_p = o_p[st.rows]  # [n, Hkv, r, d]
    out = o_p + torch.matmul(a[..., p:], value)  # [n, Hkv, r, d]
    st.calls += 1
    return out.view(n, h, q_len, d).transpose(1, 2), None  # [n, 1, H, d]


def check_served(state: PrefixState, model: torch.nn.Module) -> None:
    """After the first decode step: every layer's attention went through ``attend`` (a model whose
    layers call another attention, or drop the keyword, would have attended to the rows' own
    tokens only)."""
    if state.calls != len(state.layers):
        raise RuntimeError(f"{type(model).__name__}: {state.calls} of {len(state.layers)} attention layers ran the "
                           "shared-prefix attention in a decode step; set rollout.prefix_attention=repeated")


MIN_REPEATED_MIB = 2.0  # the auto rule (pays): measured crossover 1.9-3 MiB, see docs/performance.md


def pays(prompt_mask: Tensor, groups: int, config) -> bool:
    """``auto``: shared-prefix attention on the CPU when the repeated prompt cache of one layer (keys
    and values, ``N * Hkv * P * d`` each) would pass ``MIN_REPEATED_MIB``; below it the decode
    attention is not bound by reading the cache and the extra kernel calls cost more than they save.
    Measured on the CPU only: on a GPU, where the one SDPA kernel becomes ~12 small ones, ``auto``
    keeps the repeated cache (``shared`` forces it)."""
    if prompt_mask.device.type != "cpu":
        return False
    b, p = prompt_mask.shape
    heads = getattr(config, "num_attention_heads", 1)
    hkv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * b * groups * hkv * p * d * 4 >= MIN_REPEATED_MIB * 2**20
