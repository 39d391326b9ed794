"""One forward of each distinct prompt, shared by all the completions sampled from it.

    plan = prompt_plan(ro.prompt_ids, ro.prompt_mask)          # None when no two rows share a prompt
    logits = shared_prompt_forward(model, ro, plan)            # [n, T, V], == model(prompt + completion)
    hidden = shared_prompt_forward(decoder, ro, plan, hidden=True)   # [n, T, H] (chunked LM head)
    logits = completion_states(model, ro, None)                # the plain forward over [prompt + completion]

GRPO-style training samples G completions per prompt, and a plain forward over ``[n, P + T]``
runs every prompt G times. Here the distinct prompts ``[U, P]`` go through the model once, with
a KV cache; the cache rows are then gathered for the ``n`` completions (``index_select``, whose
backward sums the G completions' gradients into the shared prompt activations) and the
completions ``[n, T - 1]`` run against it. The log-probs of the completion tokens and their
gradients are those of the plain forward (causal attention: a prompt position never sees the
completion), up to float rounding; the prompt's share of the FLOPs falls by a factor G.

Needs a model whose forward takes transformers' ``cache=`` with a ``DynamicCache`` of plain
(full-attention) layers, and no gradient checkpointing (which turns the cache off in training);
``prompt_plan`` callers fall back to the plain forward otherwise (``supports_shared_prompt``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PromptPlan:
    first: Tensor  # [U] the first row holding each distinct prompt, ascending
    inverse: Tensor  # [n] distinct prompt of each row (numbered by first appearance)
    repeats: int = 0  # G when the rows are U contiguous runs of G (inverse == [0]*G + [1]*G + ...), else 0

    def gather(self, x: Tensor) -> Tensor:
        """Rows of ``x`` ``[U, ...]`` for the ``n`` rows ``[n, ...]``; the backward sums a prompt's rows
        (an ``expand`` + reshape for contiguous groups, whose backward is a sum, not a scatter-add)."""
        if self.repeats:
            return x.unsqueeze(1).expand(x.shape[0], self.repeats, *x.shape[1:]).reshape(-1, *x.shape[1:])
        return x.index_select(0, self.inverse)


def prompt_plan(prompt_ids: Tensor, prompt_mask: Tensor) -> PromptPlan | None:
    """Rows with identical (unpadded) prompts, or None when every prompt is distinct."""
    key = prompt_ids.masked_fill(prompt_mask == 0, -1)  # [n, P] padding compared as padding
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # [n] in sorted-prompt order
    n = key.shape[0]
    u = int(inverse.max()) + 1 if n else 0
    if u == n:
        return None
    first = torch.full((u,), n, dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=key.device), reduce="amin")  # [U]
    order = torch.argsort(first)  # renumber the prompts by first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u, device=key.device)
    first, inverse = first[order], rank[inverse]
    g = n // u
    runs = n % u == 0 and torch.equal(inverse, torch.arange(u, device=key.device).repeat_interleave(g))
    return PromptPlan(first, inverse, g if runs else 0)


def supports_shared_prompt(model: torch.nn.Module) -> bool:
    """A transformers model whose forward takes ``cache=``, with a full-attention ``DynamicCache``,
    no gradient checkpointing and no dropout (with dropout the G completions would share one
    dropout mask over their prompt, where the plain forward draws one per row)."""
    try:
        from transformers import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    base = _base(model)
    cfg = getattr(base, "config", None)
    if cfg is None or not takes_cache(model) or has_dropout(model):
        return False
    if any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules()):
        return False
    try:
        cache = DynamicCache(config=cfg)
    except (TypeError, ValueError, AttributeError, KeyError):  # a config DynamicCache cannot read
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def has_dropout(model: torch.nn.Module) -> bool:
    """Any dropout with p > 0 (modules or the config's attention dropout): the G completions of a
    prompt would then share one dropout mask over it, where the plain forward draws one per row."""
    cfg = getattr(_base(model), "config", None)
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or any(
        float(getattr(cfg, k, 0) or 0) > 0 for k in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"))


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (whose own forward takes ``**kwargs``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def takes_cache(model: torch.nn.Module) -> bool:
    """Whether the (PEFT-unwrapped) ``model.forward`` has transformers' ``cache`` argument
    (remote-code models may not)."""
    try:
        return "cache" in inspect.signature(_base(model).forward).parameters
    except (TypeError, ValueError):
        return False


def takes_4d_bool_mask(model: torch.nn.Module) -> bool:
    """SDPA attention and no position bias computed from a 2D mask (ALiBi: Bloom, MPT, Falcon-RW):
    such a model can be handed a ready ``[n, 1, q, k]`` boolean mask."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "_attn_implementation", None) == "sdpa" and not getattr(cfg, "alibi", False)
            and getattr(cfg, "model_type", "") not in ("bloom", "mpt", "falcon"))


def completion_states(model: torch.nn.Module, ro, plan: PromptPlan | None, hidden: bool = False) -> Tensor:
    """Logits ``[n, T, V]`` (``hidden=True``: a decoder's last hidden states ``[n, T, H]``) at the
    positions that predict the ``T`` completion tokens: the shared-prompt forward when ``plan``
    is given, else one plain forward over ``[prompt + completion]``."""
    if plan is not None:
        return shared_prompt_forward(model, ro, plan, hidden=hidden)
    ids, attn = ro.input_ids, ro.attention_mask  # [n, P+T]
    t = ro.completion_ids.shape[1]
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)  # [n, P+T] positions that skip left padding
    if hidden:
        return model(input_ids=ids, attention_mask=attn, position_ids=pos,
                     use_cache=False).last_hidden_state[:, -(t + 1):-1]  # [n, T, H]
    return model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                 logits_to_keep=t + 1).logits[:, :-1]  # [n, T, V]


def shared_prompt_forward(model: torch.nn.Module, ro, plan: PromptPlan, hidden: bool = False) -> Tensor:
    """Logits ``[n, T, V]`` (or the last hidden states ``[n, T, H]`` with ``hidden=True``, for a
    decoder without head) at the positions that predict the ``T`` completion tokens of ``ro``."""
    from transformers import DynamicCache

    p_ids, p_mask = ro.prompt_ids[plan.first], ro.prompt_mask[plan.first]  # [U, P]
    p_pos = (p_mask.long().cumsum(-1) - 1).clamp(min=0)  # [U, P] positions skip left padding
    cache = DynamicCache(config=model.config)
    extra = {} if hidden else {"logits_to_keep": 1}
    out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, cache=cache, use_cache=True, **extra)
    head = (out.last_hidden_state if hidden else out.logits)[:, -1:]  # [U, 1, *] predicts completion token 0
    first = plan.gather(head)  # [n, 1, *]
    t = ro.completion_ids.shape[1]
    if t == 1:
        return first
    cache = getattr(out, "cache", None) or cache
    p = p_ids.shape[1]
    if cache.get_seq_length() != p:
        raise RuntimeError(f"shared prompt forward: {type(model).__name__} did not fill the KV cache "
                           f"({cache.get_seq_length()} of {p} positions); set share_prompt: false")
    for layer in cache.layers:  # [U, h, P, d] -> [n, h, P, d]; backward sums the rows of a prompt
        layer.keys, layer.values = plan.gather(layer.keys), plan.gather(layer.values)
    c_ids = ro.completion_ids[:, :-1]  # [n, T-1] the last token predicts nothing
    attn = torch.cat([ro.prompt_mask, ro.completion_mask[:, :-1].to(ro.prompt_mask.dtype)], dim=1)  # [n, P+T-1]
    if takes_4d_bool_mask(model):  # SDPA takes a 4D boolean mask as it is
        causal = torch.ones(t - 1, p + t - 1, dtype=torch.bool, device=attn.device).tril(p)  # [T-1, P+T-1]
        attn = attn.bool()[:, None, None, :] & causal  # [n, 1, T-1, P+T-1]: every row sees its prompt
    c_pos = ro.prompt_mask.long().sum(-1, keepdim=True) + torch.arange(t - 1, device=c_ids.device)  # [n, T-1]
    out = model(input_ids=c_ids, attention_mask=attn, position_ids=c_pos, cache=cache, use_cache=True)
    rest = out.last_hidden_state if hidden else out.logits  # [n, T-1, *]
    return torch.cat([first, rest], dim=1)  # [n, T, *]
