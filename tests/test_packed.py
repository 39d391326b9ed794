"""The packed forward (rlopt/logprobs/packed.py): a hand-derived layout, its refusals, log-probs
and parameter gradients against the plain forward in float64 for all-distinct prompts and the
chunked LM head (the general equality, next to the KV-cache forward's: test_shared_prompt.py), and
when CompletionLogProbs packs, shares the KV cache or runs the plain forward."""

from __future__ import annotations

import pytest
import torch

from rlopt.logprobs import CompletionLogProbs
from rlopt.logprobs.packed import pack_layout, packed_forward, supports_packing
from rlopt.logprobs.shared_prompt import prompt_plan
from rlopt.rollout import Completions

from .test_shared_prompt import _assert_matches_plain, _model, _plain_logp, _rollout


def _three_rows() -> Completions:
    """Rows A, C, B: A and B share the prompt [5, 6] (left-padded to 3), C has [9, 4, 3].
    Completions (1 = EOS, 0 = pad): A = 7 8 1 (3 tokens), C = 2 1 (2), B = 3 1 (2)."""
    pid = torch.tensor([[0, 5, 6], [9, 4, 3], [0, 5, 6]])
    pm = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    comp = torch.tensor([[7, 8, 1], [2, 1, 0], [3, 1, 0]])
    cm = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    return Completions(pid, pm, comp, cm, torch.zeros(3, dtype=torch.bool))


def test_layout_by_hand():
    ro = _three_rows()
    plan = prompt_plan(ro.prompt_ids, ro.prompt_mask)
    assert plan.inverse.tolist() == [0, 1, 0] and plan.first.tolist() == [0, 1]
    lay = pack_layout(ro, plan)
    # group 0: prompt 5 6, then A's inputs 7 8 (its last token, EOS, predicts nothing), then B's 3
    # group 1: prompt 9 4 3, then C's input 2, then one pad column (row length 5 = the longest)
    assert lay.ids.tolist() == [[5, 6, 7, 8, 3], [9, 4, 3, 2, 0]]
    # positions continue each completion from its prompt's end: B's first token sits at 2, like A's
    assert lay.positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    m = lay.mask[:, 0].int().tolist()  # [U, R, R] query x key
    assert m[0] == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]  # B's token sees the prompt and itself, not A
    assert m[1] == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [0, 0, 0, 0, 1]]  # the pad column sees only itself (no empty softmax)
    # flat index u * 5 + position of the state predicting token j: j = 0 from the prompt's last
    # position (1 in group 0, 2 in group 1); j >= 1 from token j - 1; past the end: the prompt's last
    assert lay.gather.tolist() == [[1, 2, 3], [7, 8, 7], [1, 4, 1]]


def test_layout_refusals():
    ro = _three_rows()
    plan = prompt_plan(ro.prompt_ids, ro.prompt_mask)
    assert pack_layout(ro, plan, max_row=4) is None and pack_layout(ro, plan, max_row=5) is not None
    holes = Completions(ro.prompt_ids, ro.prompt_mask, ro.completion_ids,
                        torch.tensor([[1, 0, 1], [1, 1, 0], [1, 1, 0]]), ro.truncated)
    assert pack_layout(holes, plan) is None  # a token after a masked one would be dropped
    empty = Completions(ro.prompt_ids, torch.tensor([[0, 0, 0], [1, 1, 1], [0, 0, 0]]), ro.completion_ids,
                        ro.completion_mask, ro.truncated)
    assert pack_layout(empty, prompt_plan(empty.prompt_ids, empty.prompt_mask)) is None


def test_every_prompt_distinct_and_hidden_states_for_the_chunked_head():
    from rlopt.algorithms.lm_head import chunked_lm_head_logprobs, split_causal_lm

    model = _model(tie=True)
    ro = _rollout(g=4, t=4)
    decoder, weight, bias = split_causal_lm(model)
    hid = packed_forward(decoder, ro, pack_layout(ro, prompt_plan(ro.prompt_ids, ro.prompt_mask)), hidden=True)
    got = chunked_lm_head_logprobs(hid, weight, ro.completion_ids, bias, 1.0, chunk_rows=5, mask=ro.completion_mask)
    _assert_matches_plain(model, ro, got, seed=3)
    one = ro.select(torch.tensor([0, 4, 8]))  # no two rows share a prompt: one row each
    lay = pack_layout(one, None)
    assert lay.ids.shape[0] == 3
    logits = packed_forward(model, one, lay)
    got = logits.log_softmax(-1).gather(-1, one.completion_ids[..., None]).squeeze(-1) * one.completion_mask
    torch.testing.assert_close(got, _plain_logp(model, one), rtol=0, atol=1e-12)


def test_which_forward_completion_logprobs_runs(monkeypatch):
    """Packs by default on SDPA models; a row longer than pack_max_row, pack=False or eager
    attention share the KV cache instead; dropout shares nothing. All give the plain values."""
    from rlopt.logprobs import completion

    calls: list[str] = []
    real_packed, real_states = completion.packed_forward, completion.completion_states
    monkeypatch.setattr(completion, "packed_forward", lambda *a, **k: calls.append("packed") or real_packed(*a, **k))
    monkeypatch.setattr(completion, "completion_states",
                        lambda m, ro, plan, **k: calls.append("shared" if plan is not None else "plain")
                        or real_states(m, ro, plan, **k))
    ro = _rollout(g=3, t=5)
    cases = [({}, "sdpa", "packed"), ({"pack_max_row": 8}, "sdpa", "shared"), ({"pack": False}, "sdpa", "shared"),
             ({}, "eager", "shared"), ({"share_prompt": False}, "sdpa", "plain")]
    for kwargs, attn, expected in cases:
        model = _model(attn=attn)
        calls.clear()
        # eager attention gives NaN on left-padded rows in the plain forward too (see test_shared_prompt)
        r = ro if attn == "sdpa" else _rollout(g=3, t=5, padded=False)
        logp, _ = CompletionLogProbs(**kwargs)(model, r)
        assert calls == [expected], (kwargs, attn)
        torch.testing.assert_close(logp * r.completion_mask, _plain_logp(model, r), rtol=0, atol=1e-12)
    model = _model()
    model.config.attention_dropout = 0.1
    assert not supports_packing(model) and supports_packing(_model())
    assert CompletionLogProbs().plan(model, ro) is None  # neither packing nor the KV cache
    model = _model()
    model.gradient_checkpointing_enable()  # no KV cache in training, but packing needs none
    assert supports_packing(model)
    with pytest.raises(ValueError, match="pack_max_row"):
        CompletionLogProbs(pack_max_row=0)
    with pytest.raises(ValueError, match="pack_attention='sparse' is not valid; valid choices: auto, dense, segments"):
        CompletionLogProbs(pack_attention="sparse")


def test_segment_index_by_hand():
    """``_three_rows`` packed as in test_layout_by_hand (R = 5): row 0 = [5 6 | 7 8 | 3] (prompt at
    0-1, A's inputs at 2-3, B's at 4), row 1 = [9 4 3 | 2 _] (prompt at 0-2, C's input at 3).
    P = 3 (the longest prompt), T = 2 (A's inputs). Flat positions u * 5 + j. A: queries 2, 3;
    keys its prompt 0, 1 (row 0 has no third prompt token: masked) and its own 2, 3. C: query 8;
    keys 5, 6, 7 and 8. B: query 4; keys 0, 1, (masked) and 4. Padding slots point at 0, masked."""
    ro = _three_rows()
    lay = pack_layout(ro, prompt_plan(ro.prompt_ids, ro.prompt_mask), attention="segments")
    segs = lay.segments
    assert lay.ids.shape == (2, 5)
    assert segs.query_at.tolist() == [[2, 3], [8, 0], [4, 0]]
    assert segs.valid.tolist() == [[True, True], [True, False], [True, False]]
    assert segs.key_at.tolist() == [[0, 1, 0, 2, 3], [5, 6, 7, 8, 0], [0, 1, 0, 4, 0]]
    t, f = True, False
    assert segs.mask[:, 0].tolist() == [
        [[t, t, f, t, f], [t, t, f, t, t]],  # A: prompt 0, 1; own 2 (then 2, 3)
        [[t, t, t, t, f], [t, t, t, t, f]],  # C: prompt 5-7, own 8 (its second query is padding)
        [[t, t, f, t, f], [t, t, f, t, f]]]  # B: prompt 0, 1, own 4
    assert segs.prompt_at.tolist() == [0, 1, 5, 6, 7] and segs.prompt_src.tolist() == [0, 1, 3, 4, 5]
    assert segs.prompt_mask[:, 0].tolist() == [[[t, f, f], [t, t, f], [t, t, f]], [[t, f, f], [t, t, f], [t, t, t]]]
    assert pack_layout(ro, prompt_plan(ro.prompt_ids, ro.prompt_mask), attention="dense").segments is None


def test_auto_attention_takes_segments_for_long_rows_only():
    from rlopt.logprobs.segments import MIN_ROW, segments_pay

    g, p_len = 8, torch.tensor([30, 40])
    long, short = torch.full((2 * g,), 55), torch.full((2 * g,), 3)
    assert segments_pay(p_len, long, 40 + g * 55)  # rows of ~480: U R^2 = 4.6e5 vs 1.1e5 segment work
    assert not segments_pay(p_len, short, 40 + g * 3)  # rows of 64: dense
    assert not segments_pay(torch.tensor([300]), torch.full((2,), 40), MIN_ROW)  # long prompt, 2 completions: dense


def test_segment_attention_leaves_the_model_as_it_was():
    """The attention implementation is switched for the packed call only, also when it fails."""
    model = _model()
    ro = _rollout(g=3, t=5)
    lay = pack_layout(ro, prompt_plan(ro.prompt_ids, ro.prompt_mask), attention="segments")
    _assert_matches_plain(model, ro, packed_forward(model, ro, lay).log_softmax(-1).gather(
        -1, ro.completion_ids[..., None]).squeeze(-1) * ro.completion_mask, seed=4)
    assert model.config._attn_implementation == "sdpa"
    lay.segments.prompt_at = lay.segments.prompt_at + 10**6  # a broken index: the forward raises
    with pytest.raises((IndexError, RuntimeError)):
        packed_forward(model, ro, lay)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(input_ids=ro.input_ids).logits, model(input_ids=ro.input_ids).logits)


def test_gradient_checkpointing_keeps_the_dense_attention(monkeypatch):
    """Checkpointed blocks recompute their forward in the backward, after the segment attention is
    switched off again: ``auto`` stays dense there (still the plain values and gradients), and an
    explicit ``segments`` is refused."""
    from rlopt.logprobs import packed

    monkeypatch.setattr(packed, "segments_pay", lambda *a: True)  # auto takes segments on this small batch
    model = _model()
    ro = _rollout(g=3, t=5)
    plan = prompt_plan(ro.prompt_ids, ro.prompt_mask)
    assert CompletionLogProbs().layout(model, ro, plan).segments is not None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert CompletionLogProbs().layout(model, ro, plan).segments is None
    logp, _ = CompletionLogProbs()(model, ro)
    _assert_matches_plain(model, ro, logp * ro.completion_mask, seed=6)
    with pytest.raises(ValueError, match="pack_attention=segments cannot be combined with gradient checkpointing"):
        CompletionLogProbs(pack_attention="segments")(model, ro)

