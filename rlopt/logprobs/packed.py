"""Packed forward: each prompt once, its completions behind it in the same row, no padding.

    layout = pack_layout(ro, plan)                      # None: not packable (see ``pack_layout``)
    logits = packed_forward(model, ro, layout)          # [n, T, V], == model(prompt + completion)
    hidden = packed_forward(decoder, ro, layout, hidden=True)   # [n, T, H] (chunked LM head)

One row per distinct prompt ``u``: its real prompt tokens, then the input tokens of each of its
completions, one after the other (``[p_1..p_P | c_1[0..L_1-2] | c_2[0..L_2-2] | ...]``; a
completion's last token predicts nothing and is left out). A boolean 4D attention mask makes
each completion token see the prompt and its own earlier tokens only (a tree mask), and its
position id continues the prompt's (``P + j``), so every token computes what it would in a plain
forward over ``[prompt + completion]``, up to float rounding. The logits that predict completion
token ``j`` are gathered back to ``[n, T]``: the prompt's last position for ``j = 0`` (shared by
the group), the position of token ``j - 1`` after it.

Compared with the shared-prompt forward (shared_prompt.py) it runs one model call instead of two
and computes no padding at all: the matmul work is the real prompt and completion tokens, where
the padded layout computes ``rows x longest completion``. It needs SDPA attention that takes a
ready boolean 4D mask (``takes_4d_bool_mask``) and no dropout (the G completions share their
prompt's activations); the KV-cache API is not used, so gradient checkpointing is fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .segments import Segments, segment_attention, segment_index, segments_pay
from .shared_prompt import PromptPlan, _base, has_dropout, takes_4d_bool_mask


@dataclass
class PackLayout:
    ids: Tensor  # [U, R] packed input tokens (0 after the end of shorter rows, masked)
    positions: Tensor  # [U, R] position ids: prompt 0..P-1, completion token j at P + j
    mask: Tensor  # [U, 1, R, R] bool: query attends key
    gather: Tensor  # [n, T] flat index (u * R + position) of the state that predicts completion token j
    segments: Segments | None = None  # segment attention's indices (segments.py), None: SDPA on ``mask``


def supports_packing(model: torch.nn.Module) -> bool:
    """SDPA attention that takes a ready boolean 4D mask, and no dropout."""
    return takes_4d_bool_mask(_base(model)) and not has_dropout(model)


def pack_layout(ro, plan: PromptPlan | None, max_row: int | None = None, attention: str = "auto") -> PackLayout | None:
    """The packed rows of ``ro`` (``plan``: which rows share a prompt; None = every prompt distinct).
    None when a packed row would be longer than ``max_row`` tokens (its attention is quadratic in
    the row), a prompt is empty, or a completion mask is not a prefix (``1..1 0..0``), where the
    layout would drop tokens the plain forward reads. ``attention``: ``"dense"`` (SDPA over the
    whole row under the tree mask), ``"segments"`` (segments.py: each completion against its
    prompt and its own prefix) or ``"auto"`` (segments where they do under a quarter of the
    dense work)."""
    p_mask, c_mask = ro.prompt_mask.bool(), ro.completion_mask.bool()  # [n, P], [n, T]
    n, t = c_mask.shape
    dev = c_mask.device
    first = plan.first if plan is not None else torch.arange(n, device=dev)  # [U]
    inverse = plan.inverse if plan is not None else torch.arange(n, device=dev)  # [n]
    u = first.numel()
    lengths = c_mask.sum(-1)  # [n]
    cols = torch.arange(t, device=dev)  # [T]
    if not torch.equal(c_mask, cols < lengths[:, None]):
        return None
    pm = p_mask[first]  # [U, P]
    p_len = pm.sum(-1)  # [U]
    if bool((p_len == 0).any()):
        return None
    inputs = (lengths - 1).clamp(min=0)  # [n] completion tokens fed to the model
    # where each row's completion starts in its group's row: after the prompt and the earlier rows
    order = torch.sort(inverse, stable=True).indices  # [n] rows grouped by prompt, row order inside
    m_sorted = inputs[order]
    before = torch.cumsum(m_sorted, 0) - m_sorted  # [n] exclusive prefix sum over the grouped rows
    g_sorted = inverse[order]
    group_first = torch.searchsorted(g_sorted, g_sorted)  # [n] sorted index of the group's first row
    offset = torch.empty_like(before)
    offset[order] = p_len[g_sorted] + before - before[group_first]  # [n]
    row_len = p_len + torch.zeros(u, dtype=inputs.dtype, device=dev).index_add_(0, inverse, inputs)  # [U]
    r = int(row_len.max())
    if max_row is not None and r > max_row:
        return None
    ids = torch.zeros((u, r), dtype=ro.prompt_ids.dtype, device=dev)  # [U, R]
    pos = torch.zeros(u, r, dtype=torch.long, device=dev)  # [U, R]
    seg = torch.full((u, r), -2, dtype=torch.long, device=dev)  # [U, R] -1 prompt, i row i, -2 pad
    pu, pp = pm.nonzero(as_tuple=True)
    pcol = (pm.long().cumsum(-1) - 1)[pu, pp]
    ids[pu, pcol] = ro.prompt_ids[first][pu, pp]
    pos[pu, pcol] = pcol
    seg[pu, pcol] = -1
    ci, cj = (cols < inputs[:, None]).nonzero(as_tuple=True)
    g, at = inverse[ci], offset[ci] + cj
    ids[g, at] = ro.completion_ids[ci, cj]
    pos[g, at] = p_len[g] + cj
    seg[g, at] = ci
    causal = torch.ones(r, r, dtype=torch.bool, device=dev).tril()  # [R, R]
    sq, sk = seg[:, :, None], seg[:, None, :]  # [U, R, 1], [U, 1, R]
    mask = causal & ((sk == -1) | (sk == sq)) & (sq != -2)  # [U, R, R]
    mask |= torch.eye(r, dtype=torch.bool, device=dev)  # padding queries see themselves (no empty softmax)
    last = p_len[inverse] - 1  # [n] the prompt's last position predicts completion token 0
    at = torch.where((cols == 0) | (cols >= lengths[:, None]), last[:, None], offset[:, None] + cols - 1)  # [n, T]
    segs = None
    if attention == "segments" or (attention == "auto" and segments_pay(p_len, inputs, r)):
        segs = segment_index(p_len, inverse, offset, inputs, r)
    return PackLayout(ids, pos, mask[:, None], inverse[:, None] * r + at, segs)


def packed_forward(model: torch.nn.Module, ro, layout: PackLayout, hidden: bool = False) -> Tensor:
    """Logits ``[n, T, V]`` (``hidden=True``: a decoder's last hidden states ``[n, T, H]``) at the
    positions that predict the ``T`` completion tokens of ``ro``."""
    if layout.segments is None:
        out = model(input_ids=layout.ids, attention_mask=layout.mask, position_ids=layout.positions, use_cache=False)
    else:
        with segment_attention(model):
            out = model(input_ids=layout.ids, attention_mask=layout.mask, position_ids=layout.positions,
                        use_cache=False, rlopt_segments=layout.segments)
    states = out.last_hidden_state if hidden else out.logits  # [U, R, *]
    n, t = layout.gather.shape
    return states.reshape(-1, states.shape[-1]).index_select(0, layout.gather.reshape(-1)).view(n, t, -1)
