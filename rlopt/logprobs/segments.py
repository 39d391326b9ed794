"""Segment attention for packed rows: each completion attends to its prompt and its own prefix only.

    segs = segment_index(p_len, inverse, offset, inputs, r)          # pack_layout does it
    with segment_attention(model):                                   # packed_forward does it
        out = model(..., attention_mask=layout.mask, rlopt_segments=segs)

A packed row (packed.py) holds a prompt and all its completions, ``R`` tokens; SDPA with the
tree mask computes all ``R x R`` query-key pairs and masks most of them (a completion token
sees ``P + j`` of them). Here the attention of one packed forward runs in two dense pieces:

- the prompt tokens of each row attend causally to the prompt: ``[U, H, P, P]``;
- the input tokens of each completion (gathered from the rows: ``[n, H, T, d]``) attend to
  their prompt's keys and their own earlier tokens: ``[n, H, T, P + T]``, keys gathered the same
  way (the gradient of a gather is the scatter-add back into the row);

and the outputs are scattered back to the row positions (padding positions get zeros; nothing
reads them). The same softmax over the same keys as the tree mask, so the same values up to float
rounding (tested in float64 against the plain forward); attention work ``U P^2 + n T (P + T)``
instead of ``U R^2``, R ~ P + G T. The linear layers are untouched (they are per token).

It is switched in for one forward by setting the config's attention implementation to a
registered ``rlopt_segments`` function (transformers ``AttentionInterface``), which falls back
to SDPA for any call without ``rlopt_segments``; the 4D mask is passed too (transformers hands
a ready 4D mask to the layers as it is) so a model that ignores the keyword stays exact. Not
under gradient checkpointing: the blocks would recompute their forward in the backward, after
the switch is undone, along another path (``CompletionLogProbs`` keeps the dense attention there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "rlopt_segments"


@dataclass
class Segments:
    prompt_mask: Tensor  # [U, 1, P, P] bool: prompt query attends prompt key (causal, real keys)
    prompt_at: Tensor  # [m] flat row positions (u * R + j) of the real prompt tokens
    prompt_src: Tensor  # [m] their index in the flattened [U * P] prompt block
    query_at: Tensor  # [n, T] flat row position of completion input token j (0 where j is past its end)
    key_at: Tensor  # [n, P + T] flat row positions of its keys: its prompt's P, then its own T
    mask: Tensor  # [n, 1, T, P + T] bool: completion query attends key
    valid: Tensor  # [n, T] bool: j is one of the completion's input tokens


def segment_index(p_len: Tensor, inverse: Tensor, offset: Tensor, inputs: Tensor, r: int) -> Segments:
    """The gather / scatter indices of packed rows of length ``r``: row ``u`` holds its prompt
    (``p_len[u]`` tokens) at 0.., completion ``i`` (of row ``inverse[i]``) its ``inputs[i]`` input
    tokens from ``offset[i]`` on."""
    dev = p_len.device
    u, n = p_len.numel(), inverse.numel()
    p, t = int(p_len.max()), max(int(inputs.max()), 1)
    pj, tj = torch.arange(p, device=dev), torch.arange(t, device=dev)  # [P], [T]
    p_real = pj < p_len[:, None]  # [U, P]
    prompt_mask = torch.ones(p, p, dtype=torch.bool, device=dev).tril() & p_real[:, None, :]  # [U, P, P]
    flat_p = torch.arange(u, device=dev)[:, None] * r + pj  # [U, P]
    valid = tj < inputs[:, None]  # [n, T]
    row = inverse[:, None] * r  # [n, 1]
    query_at = torch.where(valid, row + offset[:, None] + tj, 0)  # [n, T]
    key_prompt = torch.where(p_real[inverse], row + pj, 0)  # [n, P]
    own = torch.ones(t, t, dtype=torch.bool, device=dev).tril() & valid[:, None, :]  # [n, T, T]
    mask = torch.cat([p_real[inverse][:, None, :].expand(n, t, p), own], dim=-1)  # [n, T, P + T]
    return Segments(prompt_mask[:, None], flat_p[p_real], torch.arange(u * p, device=dev).view(u, p)[p_real],
                    query_at, torch.cat([key_prompt, query_at], dim=1), mask[:, None], valid)


MIN_ROW = 384  # shorter rows keep the dense attention


def segments_pay(p_len: Tensor, inputs: Tensor, r: int) -> bool:
    """Whether to use segment attention: rows of at least ``MIN_ROW`` tokens where it does under a
    quarter of the dense ``U R^2`` work. Below that its gathers and second kernel call cost what
    they save (update passes on this project's 2-core CPU, benchmarks/update_forward.py: rows of
    ~50 tokens 0.8x the dense speed, ~300 tokens 1.0x, ~470 tokens 1.1x)."""
    p, t = int(p_len.max()), int(inputs.max())
    return r >= MIN_ROW and 4 * (p_len.numel() * p * p + inputs.numel() * t * (p + t)) < p_len.numel() * r * r


def _attend(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
            dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The attention function: ``query`` ``[U, H, R, d]``, ``key`` / ``value`` ``[U, Hkv, R, d]``;
    returns ``[U, R, H, d]`` as transformers' attention functions do."""
    segs: Segments | None = kwargs.pop("rlopt_segments", None)
    if segs is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    u, h, r, d = query.shape
    gqa = key.shape[1] != h
    p = segs.prompt_mask.shape[-1]
    out_p = F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], attn_mask=segs.prompt_mask,
                                           dropout_p=dropout, scale=scaling, enable_gqa=gqa)  # [U, H, P, d]
    qf, kf, vf = (x.transpose(1, 2).reshape(u * r, x.shape[1], d) for x in (query, key, value))  # [U*R, H*, d]
    q_c = qf[segs.query_at].transpose(1, 2)  # [n, H, T, d]
    k_c, v_c = (x[segs.key_at].transpose(1, 2) for x in (kf, vf))  # [n, Hkv, P + T, d]
    out_c = F.scaled_dot_product_attention(q_c, k_c, v_c, attn_mask=segs.mask, dropout_p=dropout, scale=scaling,
                                           enable_gqa=gqa)  # [n, H, T, d]
    out = query.new_zeros(u * r, h, d)  # [U*R, H, d]
    out = out.index_copy(0, segs.prompt_at, out_p.transpose(1, 2).reshape(u * p, h, d)[segs.prompt_src])
    out = out.index_copy(0, segs.query_at[segs.valid], out_c.transpose(1, 2)[segs.valid])
    return out.view(u, r, h, d), None


@contextlib.contextmanager
def attention_function(model: torch.nn.Module, name: str, fn) -> Iterator[None]:
    """Within the block, ``model``'s attention layers call ``fn``, registered as ``name`` in
    transformers' ``AttentionInterface``; the configs' implementation is restored on exit."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def segment_attention(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, ``model``'s attention layers call the segment attention."""
    return attention_function(model, NAME, _attend)
