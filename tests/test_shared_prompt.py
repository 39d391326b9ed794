"""The shared-prompt forwards (rlopt/logprobs/shared_prompt.py: the KV cache; packed.py: packed
rows) against the plain forward, in float64: the same log-probs and the same parameter gradients,
with left-padded prompts of different lengths, completions ending at different steps, one-token
completions, and the chunked LM head. The packed layout itself: tests/test_packed.py."""

from __future__ import annotations

import pytest
import torch

from rlopt.rollout import Completions, completion_mask_from
from rlopt.logprobs.packed import pack_layout, packed_forward
from rlopt.logprobs.shared_prompt import prompt_plan, shared_prompt_forward, supports_shared_prompt


def _model(tie: bool = True, vocab: int = 13, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=tie)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double()
    assert model.config._attn_implementation == attn
    return model


def _rollout(g: int = 3, t: int = 5, seed: int = 1, padded: bool = True) -> Completions:
    """Three prompts (lengths 4, 2, 3, left-padded to 4; or all of length 4), ``g`` completions
    each; EOS (1) at random."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[5, 6, 7, 8], [9, 4], [3, 11, 12]] if padded else [[5, 6, 7, 8], [9, 4, 2, 10], [3, 11, 12, 2]]
    p = max(map(len, prompts))
    pid = torch.tensor([[0] * (p - len(x)) + x for x in prompts])  # [B, P]
    pm = (torch.arange(p)[None] >= torch.tensor([p - len(x) for x in prompts])[:, None]).long()  # [B, P]
    pid, pm = pid.repeat_interleave(g, 0), pm.repeat_interleave(g, 0)  # [N, P]
    comp = torch.randint(1, 13, (pid.shape[0], t), generator=gen)  # [N, T], 1 = EOS
    cm, trunc = completion_mask_from(comp, 1)
    comp = torch.where(cm.bool(), comp, torch.zeros_like(comp))
    return Completions(pid, pm, comp, cm, trunc)


def _plain_logp(model, ro: Completions) -> torch.Tensor:
    ids, attn = ro.input_ids, ro.attention_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    t = ro.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -(t + 1):-1]
    return logits.log_softmax(-1).gather(-1, ro.completion_ids[..., None]).squeeze(-1) * ro.completion_mask


def _shared_logp(model, ro: Completions, packed: str | None = None) -> torch.Tensor:
    """``packed``: None (the KV-cache forward), or the packed rows' attention (dense / segments)."""
    plan = prompt_plan(ro.prompt_ids, ro.prompt_mask)
    logits = (packed_forward(model, ro, pack_layout(ro, plan, attention=packed)) if packed
              else shared_prompt_forward(model, ro, plan))
    return logits.log_softmax(-1).gather(-1, ro.completion_ids[..., None]).squeeze(-1) * ro.completion_mask


def _grads(model, logp: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logp * w).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_matches_plain(model, ro: Completions, got: torch.Tensor, seed: int) -> None:
    """``got`` [N, T] are the plain forward's log-probs, and so are the parameter gradients of a
    random weighting of them."""
    w = torch.randn(ro.completion_ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = _plain_logp(model, ro)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    _assert_grads_close(_grads(model, got, w), _grads(model, ref, w))


def _assert_grads_close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """Llama's RMSNorm and rotary tables compute in float32 even in a float64 model, so the
    gradients agree to float32 rounding (~1e-7 relative), not 1e-15: the shared path sums a
    prompt's G rows in another order. 2e-6 of each tensor's largest entry; a wrong gradient
    (a row counted once instead of G times, a lost cache gradient) is off by O(1) of it."""
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(b.abs().max()) + 1e-12)


def test_plan_groups_identical_prompts_only():
    ro = _rollout(g=3)
    plan = prompt_plan(ro.prompt_ids, ro.prompt_mask)
    assert plan.first.tolist() == sorted(plan.first.tolist()) or len(plan.first) == 3
    # rows 0-2, 3-5, 6-8 share a prompt: the inverse maps each group to one distinct prompt
    assert plan.inverse.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and plan.first.tolist() == [0, 3, 6]
    assert plan.repeats == 3  # contiguous groups: gathered by expand
    x = torch.arange(3.0)[:, None]  # [U, 1]
    assert plan.gather(x).squeeze(1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    shuffled = prompt_plan(ro.prompt_ids[[4, 0, 8, 1, 3]], ro.prompt_mask[[4, 0, 8, 1, 3]])
    assert shuffled.repeats == 0 and shuffled.inverse.tolist() == [0, 1, 2, 1, 0] and shuffled.first.tolist() == [0, 1, 2]
    assert shuffled.gather(x).squeeze(1).tolist() == [0, 1, 2, 1, 0]
    assert prompt_plan(ro.prompt_ids[::3], ro.prompt_mask[::3]) is None  # all distinct: no plan
    # same tokens but a different padding pattern would be a different prompt
    pm = ro.prompt_mask.clone()
    pm[1, -1] = 0
    assert len(set(prompt_plan(ro.prompt_ids, pm).inverse.tolist())) == 4


@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shuffle", [False, True])  # contiguous groups (expand) / any order (index_select)
@pytest.mark.parametrize("attn,packed", [("sdpa", None), ("eager", None), ("sdpa", "dense"), ("sdpa", "segments")])
def test_logprobs_and_gradients_equal_the_plain_forward(t, tie, shuffle, attn, packed):
    model = _model(tie=tie, attn=attn)  # packing: SDPA only; grouped-query attention (4 heads, 2 KV heads)
    # eager attention gives NaN on left-padded prompt rows in the *plain* forward too (transformers
    # 5.24, float64): compare it on unpadded prompts
    ro = _rollout(g=3, t=t, padded=attn == "sdpa")
    if shuffle:
        ro = ro.select(torch.tensor([4, 0, 8, 1, 3, 7, 2, 6, 5]))
    _assert_matches_plain(model, ro, _shared_logp(model, ro, packed), seed=2)


def test_hidden_states_for_the_chunked_head():
    from rlopt.algorithms.lm_head import chunked_lm_head_logprobs, split_causal_lm

    model = _model(tie=True)
    ro = _rollout(g=4, t=4)
    decoder, weight, bias = split_causal_lm(model)
    hid = shared_prompt_forward(decoder, ro, prompt_plan(ro.prompt_ids, ro.prompt_mask), hidden=True)  # [N, T, H]
    got = chunked_lm_head_logprobs(hid, weight, ro.completion_ids, bias, 1.0, chunk_rows=5, mask=ro.completion_mask)
    _assert_matches_plain(model, ro, got, seed=3)


def test_module_uses_it_and_matches_share_prompt_false():
    """PolicyOptModule.completion_logprobs with and without sharing: same values and gradients."""
    from rlopt.algorithms import build_preset
    from rlopt.logprobs import CompletionLogProbs
    from rlopt.module import PolicyOptModule
    from rlopt.rewards import RewardSet, exact_match
    from rlopt.tiny import build_tokenizer

    model = _model(tie=True, vocab=len(build_tokenizer()))
    ro = _rollout(g=3, t=5)
    out = {}
    for share in (True, False):
        adv, obj = build_preset("grpo")
        m = PolicyOptModule(model, build_tokenizer(), adv, obj, RewardSet({"m": exact_match}), group_size=3,
                            logprobs=CompletionLogProbs(share_prompt=share))
        assert (m.logprobs.plan(model, ro) is not None) == share
        logp, ent = m.completion_logprobs(model, ro, with_entropy=True)
        mask = ro.completion_mask.double()  # values after EOS are never read (every objective masks them)
        out[share] = (logp.detach() * mask, ent.detach() * mask, _grads(model, logp, mask))
    # float32 rounding inside the float64 model (see _assert_grads_close); the module trims padding
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-7)
    _assert_grads_close(out[True][2], out[False][2])
    adv, obj = build_preset("grpo")  # the update's log-probs must be those of the sampling temperature
    with pytest.raises(ValueError, match=r"logprobs.temperature 0.5 differs from the rollout engine's 1.0"):
        PolicyOptModule(model, build_tokenizer(), adv, obj, RewardSet({"m": exact_match}), group_size=3,
                        logprobs=CompletionLogProbs(temperature=0.5))


def test_gradient_checkpointing_dropout_and_no_cache_argument_turn_it_off():
    from rlopt.logprobs.shared_prompt import takes_4d_bool_mask

    model = _model()
    assert supports_shared_prompt(model) and takes_4d_bool_mask(model)
    model.gradient_checkpointing_enable()
    assert not supports_shared_prompt(model)  # transformers turns the cache off in training
    model = _model()
    model.config.attention_dropout = 0.1
    assert not supports_shared_prompt(model)  # G completions would share one dropout mask of their prompt
    model = _model()
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.05))  # e.g. LoRA dropout
    assert not supports_shared_prompt(model)

    class OldStyle(torch.nn.Module):  # a remote-code model: past_key_values=, no cache=
        config = _model().config

        def forward(self, input_ids=None, attention_mask=None, past_key_values=None):
            raise AssertionError("not called")

    assert not supports_shared_prompt(OldStyle())
    with pytest.raises(ValueError, match="rollout=hf_generate"):
        from rlopt.rollout.lean import KVCacheSampler

        KVCacheSampler().generate(OldStyle(), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                                  2, eos_token_id=1, pad_token_id=0)
    alibi = _model()
    alibi.config.alibi = True  # position bias built from a 2D mask (Falcon-RW, Bloom, MPT): no 4D mask
    assert not takes_4d_bool_mask(alibi) and not takes_4d_bool_mask(_model(attn="eager"))
