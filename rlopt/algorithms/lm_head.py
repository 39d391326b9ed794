"""LM head + per-token log-probs, chunked, with its own backward: never the full ``[R, V]`` logits.

    logp = chunked_lm_head_logprobs(hidden, head.weight, ids, temperature=0.7)          # [N, T]
    logp, ent = chunked_lm_head_logprobs(hidden, w, ids, bias=b, return_entropy=True)   # + [N, T]
    logp = chunked_lm_head_logprobs(hidden, w, ids, mask=completion_mask)                # pad -> 0

It computes ``log_softmax((h @ W.T + b) / tau).gather(ids)`` (and the entropy of the same
distribution) ``chunk_rows`` rows of ``hidden`` at a time. The naive path materialises the
``[N*T, V]`` logits several times over (the logits, the log-softmax kept for backward, its
gradient); at a 152k vocabulary that is about 0.6 MB per token per copy. Here the forward keeps
only one ``[chunk_rows, V]`` block alive at a time and saves the row-wise ``logsumexp`` (and the
softmax mean of the logits when the entropy is asked for); the backward recomputes each chunk's
logits, forms ``d loss / d logits`` in place and accumulates the gradients of ``hidden`` (per
chunk) and ``weight`` / ``bias`` (summed over chunks). The price is one extra ``h @ W.T``
matmul (the recomputation): 4 matmuls instead of 3. ``saved_rows`` buys part of it back with
memory: the logits of that many rows are kept from the forward (selective recomputation).

With ``z = (h W^T + b) / tau``, ``p = softmax(z)``, ``lse = logsumexp(z)``:

* ``logp = z_y - lse``;          ``d logp / d z = onehot(y) - p``
* ``H = lse - sum_j p_j z_j``;   ``d H / d z_j = p_j (E_p[z] - z_j)``

and ``d / d logits = (d / d z) / tau``. The matmuls run in the input dtype; the softmax math
in float32 (float64 stays float64). Rows where ``mask`` is 0 are skipped and return 0 (an
objective never reads them); pure torch, no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import check_range

DEFAULT_CHUNK_ROWS = 512


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, inv_tau: float) -> Tensor:
    """``(h @ W.T + b) / tau`` for one chunk, in the math dtype: ``[c, V]``."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    z = z.to(_math_dtype(h.dtype))
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    return z


class _ChunkedLMHeadLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, inv_tau: float,
                chunk_rows: int, with_entropy: bool, saved_rows: int) -> tuple[Tensor, Tensor]:
        rows = hidden.shape[0]
        kept: dict[int, Tensor] = {}  # chunk start -> its logits, for the chunks within saved_rows
        mdt = _math_dtype(hidden.dtype)
        logp = torch.empty(rows, dtype=mdt, device=hidden.device)
        lse = torch.empty(rows, dtype=mdt, device=hidden.device)
        ez = torch.empty(rows if with_entropy else 0, dtype=mdt, device=hidden.device)  # E_p[z]
        for s in range(0, rows, chunk_rows):
            e = min(s + chunk_rows, rows)
            z = _chunk_logits(hidden[s:e], weight, bias, inv_tau)  # [c, V]
            lse_c = torch.logsumexp(z, dim=-1)  # [c]
            lse[s:e] = lse_c
            logp[s:e] = z.gather(-1, ids[s:e, None]).squeeze(-1) - lse_c
            if with_entropy:
                ez[s:e] = torch.softmax(z, dim=-1).mul_(z).sum(-1)  # a [c, V] temporary, then freed
            if e <= saved_rows:
                kept[s] = z
        ent = lse - ez if with_entropy else torch.zeros_like(logp)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ez)
        ctx.kept = kept
        ctx.inv_tau, ctx.chunk_rows, ctx.with_entropy = inv_tau, chunk_rows, with_entropy
        ctx.set_materialize_grads(False)  # an unused output (a detached entropy) gets None, not zeros
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor, g_ent: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, ids, lse, ez = ctx.saved_tensors
        inv_tau, chunk_rows = ctx.inv_tau, ctx.chunk_rows
        use_ent = ctx.with_entropy and g_ent is not None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        rows = hidden.shape[0]
        mdt = lse.dtype
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(mdt)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=mdt, device=weight.device) if need_w else None  # accumulated
        grad_b = torch.zeros(weight.shape[0], dtype=mdt, device=weight.device) if need_b else None
        kept, ctx.kept = ctx.kept, {}  # consumed in place below (a second backward recomputes them)
        starts = sorted(range(0, rows, chunk_rows), key=lambda s: s not in kept)  # kept chunks first: freed early
        for s in starts:
            e = min(s + chunk_rows, rows)
            h = hidden[s:e]
            z = kept.pop(s, None)
            if z is None:
                z = _chunk_logits(h, weight, bias, inv_tau)  # [c, V] recomputed
            gl = g_logp[s:e, None]  # [c, 1]
            if use_ent:
                ge = g_ent[s:e, None].to(mdt)
                p = torch.exp(z - lse[s:e, None])  # [c, V]
                # dz = gl*(onehot - p) + ge*p*(E[z] - z)  ->  -p * (gl + ge*(z - E[z])) + gl*onehot
                dz = z.sub_(ez[s:e, None]).mul_(ge).add_(gl).mul_(p).neg_()
                del p
            else:
                dz = z.sub_(lse[s:e, None]).exp_().mul_(gl).neg_()  # -gl * p, in place over z
            dz.scatter_add_(-1, ids[s:e, None], gl)
            if inv_tau != 1.0:
                dz.mul_(inv_tau)
            if need_b:
                grad_b += dz.sum(0)
            dzc = dz.to(hidden.dtype)
            if need_h:
                torch.mm(dzc, weight, out=grad_h[s:e])
            if need_w:
                if mdt == hidden.dtype:
                    grad_w.addmm_(dzc.t(), h)
                else:
                    grad_w += (dzc.t() @ h).to(mdt)
            del z, dz, dzc
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_lm_head_logprobs(hidden: Tensor, weight: Tensor, ids: Tensor, bias: Tensor | None = None,
                             temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                             return_entropy: bool = False, mask: Tensor | None = None, saved_rows: int = 0
                             ) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log p(ids)`` ``[N, T]`` of ``softmax((hidden @ weight.T + bias) / temperature)``.

    ``hidden`` ``[N, T, H]`` (any leading shape matching ``ids``), ``weight`` ``[V, H]``,
    ``bias`` ``[V]`` or None. With ``return_entropy`` also the entropy ``[N, T]``. ``mask``
    (same shape as ``ids``): rows where it is 0 are not computed and get 0 (and no gradient).
    ``saved_rows``: the logits of the first chunks, up to this many rows, are kept from the forward
    for the backward instead of recomputed (``saved_rows_for`` turns a memory budget into rows):
    a fraction f of the rows saved costs ``f * R * V`` floats and saves ``f`` of the extra matmul.
    Results are float32 (float64 for float64 inputs)."""
    if hidden.shape[:-1] != ids.shape:
        raise ValueError(f"shape mismatch: hidden{list(hidden.shape)} must be ids{list(ids.shape)} + [H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight{list(weight.shape)} must be [V, H] with H = {hidden.shape[-1]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias{list(bias.shape)} must be [V] = [{weight.shape[0]}]")
    tau = check_range("temperature", temperature, low=0.0, low_inclusive=False)
    step = int(check_range("chunk_rows", chunk_rows, low=1))
    saved = int(check_range("saved_rows", saved_rows, low=0))
    out_shape = ids.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # [R, H]
    flat_ids = ids.reshape(-1)  # [R]
    keep = None
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(f"mask{list(mask.shape)} must match ids{list(ids.shape)}")
        keep = mask.reshape(-1).nonzero().squeeze(-1)  # [R'] rows that are computed
        h, flat_ids = h.index_select(0, keep), flat_ids.index_select(0, keep)
    if h.dtype != weight.dtype:
        raise ValueError(f"hidden ({h.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if h.shape[0] == 0:  # nothing to compute; keep the graph connected (zero gradients)
        logp = ent = (h.sum() + weight.sum()).to(_math_dtype(h.dtype)) * 0 + h.new_zeros(0, dtype=_math_dtype(h.dtype))
    else:
        logp, ent = _ChunkedLMHeadLogprob.apply(h.contiguous(), weight, bias, flat_ids.contiguous(), 1.0 / tau,
                                                step, bool(return_entropy), saved)
    if keep is not None:
        full = logp.new_zeros(ids.numel())
        logp = full.index_copy(0, keep, logp)
        if return_entropy:
            ent = full.index_copy(0, keep, ent)
    logp = logp.view(out_shape)
    return (logp, ent.view(out_shape)) if return_entropy else logp


def saved_rows_for(vocab_size: int, budget_mib: float, dtype: torch.dtype = torch.float32) -> int:
    """Rows of ``[rows, V]`` logits (math dtype: float32, float64 for float64) that fit ``budget_mib``."""
    return int(float(budget_mib) * (1 << 20)) // (_math_dtype(dtype).itemsize * max(int(vocab_size), 1))


def auto_chunk_rows(vocab_size: int, budget_bytes: int = 128 << 20) -> int:
    """Rows per chunk so one float32 ``[rows, V]`` block takes about ``budget_bytes`` (>= 16 rows)."""
    return max(16, int(budget_bytes) // (4 * max(int(vocab_size), 1)))


def split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, Tensor, Tensor | None]:
    """``(decoder, head_weight, head_bias)`` of a transformers causal LM whose logits are exactly
    ``decoder(...).last_hidden_state @ W.T + b`` (Llama, Qwen2, Mistral, ...). Tied weights need
    nothing special: the head's weight *is* the embedding's parameter and autograd sums both
    gradients into it. Models that post-process the logits (soft-capping, a logit scale) are refused."""
    cfg = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        val = getattr(cfg, key, None)
        if val not in (None, 1, 1.0):
            raise ValueError(f"chunked_lm_head: the model's config sets {key}={val}; its logits are not a plain "
                             "linear head, so the chunked head would compute different log-probs (turn it off)")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"chunked_lm_head: {type(model).__name__} does not expose a decoder (get_decoder()) and a "
                         "linear head (get_output_embeddings()); turn chunked_lm_head off for this model")
    return decoder, head.weight, head.bias
