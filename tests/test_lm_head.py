"""chunked_lm_head_logprobs == log_softmax((h @ W.T + b) / tau).gather, values and gradients."""

import pytest
import torch

from rlopt.algorithms.lm_head import chunked_lm_head_logprobs

F64 = torch.float64


def make(dtype, n=3, t=7, h=16, v=37, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, t, h, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, dtype=F64) / 2).to(dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=F64).to(dtype).requires_grad_(True) if bias else None
    ids = torch.randint(0, v, (n, t), generator=g)
    wl = torch.randn(n, t, generator=g, dtype=F64).to(dtype)  # upstream weights for logp
    we = torch.randn(n, t, generator=g, dtype=F64).to(dtype)  # ... and for the entropy
    return hid, w, b, ids, wl, we


def naive(hid, w, b, ids, tau):
    z = hid @ w.t()
    if b is not None:
        z = z + b
    ls = torch.log_softmax(z / tau, dim=-1)  # [n, t, V]
    return ls.gather(-1, ids[..., None]).squeeze(-1), -(ls.exp() * ls).sum(-1)


def params(hid, w, b):
    return [x for x in (hid, w, b) if x is not None]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("tau", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 1000])  # 21 rows: 4 and 5 do not divide them
@pytest.mark.parametrize("bias", [False, True])
def test_logp_values_and_gradients_match_naive(dtype, tau, chunk_rows, bias):
    hid, w, b, ids, wl, _ = make(dtype, bias=bias)
    logp = chunked_lm_head_logprobs(hid, w, ids, bias=b, temperature=tau, chunk_rows=chunk_rows)
    assert logp.shape == ids.shape and logp.dtype == dtype
    grads = torch.autograd.grad((logp * wl).sum(), params(hid, w, b))
    ref, _ = naive(hid, w, b, ids, tau)
    ref_grads = torch.autograd.grad((ref * wl).sum(), params(hid, w, b))
    torch.testing.assert_close(logp.detach(), ref.detach(), **tol(dtype))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("tau", [1.0, 0.6])
@pytest.mark.parametrize("chunk_rows", [2, 8])
def test_entropy_and_its_gradient_match_direct_computation(dtype, tau, chunk_rows):
    hid, w, b, ids, wl, we = make(dtype)
    logp, ent = chunked_lm_head_logprobs(hid, w, ids, bias=b, temperature=tau, chunk_rows=chunk_rows,
                                         return_entropy=True)
    ref, ref_ent = naive(hid, w, b, ids, tau)
    torch.testing.assert_close(ent.detach(), ref_ent.detach(), **tol(dtype))
    torch.testing.assert_close(logp.detach(), ref.detach(), **tol(dtype))
    # gradients through logp and entropy together, and through the entropy alone
    for lw in (wl, torch.zeros_like(wl)):
        grads = torch.autograd.grad((logp * lw + ent * we).sum(), params(hid, w, b), retain_graph=True)
        ref_grads = torch.autograd.grad((ref * lw + ref_ent * we).sum(), params(hid, w, b), retain_graph=True)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, **tol(dtype))


@pytest.mark.parametrize("saved_rows", [4, 10, 21, 1000])  # 21 rows in chunks of 4: 1, 2, all, all saved
@pytest.mark.parametrize("entropy", [False, True])
def test_saved_logits_give_the_same_values_and_gradients(saved_rows, entropy):
    """Keeping chunks' logits from the forward (saved_rows) replaces the recomputation by the very
    same numbers: bitwise equal to saved_rows=0, and to the naive path within float64 rounding."""
    hid, w, b, ids, wl, we = make(F64)
    out = {}
    for k in (0, saved_rows):
        logp, ent = chunked_lm_head_logprobs(hid, w, ids, bias=b, temperature=0.7, chunk_rows=4,
                                             return_entropy=True, saved_rows=k)
        loss = (logp * wl).sum() + ((ent * we).sum() if entropy else 0)
        out[k] = (logp.detach(), torch.autograd.grad(loss, params(hid, w, b)))
    assert torch.equal(out[0][0], out[saved_rows][0])
    for a, c in zip(out[0][1], out[saved_rows][1]):
        assert torch.equal(a, c)
    ref, ref_ent = naive(hid, w, b, ids, 0.7)
    ref_grads = torch.autograd.grad((ref * wl).sum() + ((ref_ent * we).sum() if entropy else 0), params(hid, w, b))
    for g, r in zip(out[saved_rows][1], ref_grads):
        torch.testing.assert_close(g, r, **tol(F64))


def test_saved_logits_skip_the_recomputation_and_survive_a_second_backward(monkeypatch):
    """Saved chunks are not recomputed (counted); retain_graph: the first backward consumes the
    saved logits in place, the second recomputes them."""
    from rlopt.algorithms import lm_head
    from rlopt.algorithms.lm_head import saved_rows_for

    calls = []
    real = lm_head._chunk_logits
    monkeypatch.setattr(lm_head, "_chunk_logits", lambda h, *a: calls.append(h.shape[0]) or real(h, *a))
    hid, w, b, ids, wl, _ = make(F64)  # 21 rows: chunks of 4, 4, 4, 4, 4, 1
    logp = chunked_lm_head_logprobs(hid, w, ids, bias=b, chunk_rows=4, saved_rows=10)
    assert len(calls) == 6
    loss = (logp * wl).sum()
    g1 = torch.autograd.grad(loss, params(hid, w, b), retain_graph=True)
    assert len(calls) == 6 + 4  # the two chunks within 10 rows came from the forward
    g2 = torch.autograd.grad(loss, params(hid, w, b))
    assert len(calls) == 6 + 4 + 6
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    assert saved_rows_for(151936, 1024) == (1 << 30) // (4 * 151936)  # 1 GiB of float32 rows: 1766
    assert saved_rows_for(37, 1, torch.float64) == (1 << 20) // (8 * 37)
    with pytest.raises(ValueError, match="saved_rows"):
        chunked_lm_head_logprobs(hid, w, ids, saved_rows=-1)


def test_detached_entropy_gives_the_logp_gradient_only():
    hid, w, b, ids, wl, _ = make(F64)
    logp, ent = chunked_lm_head_logprobs(hid, w, ids, bias=b, temperature=0.8, chunk_rows=3, return_entropy=True)
    grads = torch.autograd.grad((logp * wl).sum() + ent.detach().sum(), params(hid, w, b))
    ref, _ = naive(hid, w, b, ids, 0.8)
    ref_grads = torch.autograd.grad((ref * wl).sum(), params(hid, w, b))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol(F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_masked_rows_are_zero_and_get_no_gradient(dtype, chunk_rows):
    hid, w, b, ids, wl, we = make(dtype, n=4, t=6)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 3:] = 0  # right padding after EOS
    mask[2, :] = 0  # an empty row
    mask[3, 1] = 0
    logp, ent = chunked_lm_head_logprobs(hid, w, ids, bias=b, temperature=0.9, chunk_rows=chunk_rows,
                                         return_entropy=True, mask=mask)
    ref, ref_ent = naive(hid, w, b, ids, 0.9)
    m = mask.bool()
    assert (logp[~m] == 0).all() and (ent[~m] == 0).all()
    torch.testing.assert_close(logp[m].detach(), ref[m].detach(), **tol(dtype))
    torch.testing.assert_close(ent[m].detach(), ref_ent[m].detach(), **tol(dtype))
    mf = mask.to(dtype)
    grads = torch.autograd.grad(((logp * wl + ent * we) * mf).sum(), params(hid, w, b))
    ref_grads = torch.autograd.grad(((ref * wl + ref_ent * we) * mf).sum(), params(hid, w, b))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol(dtype))
    assert (grads[0][~m] == 0).all()


def test_all_rows_masked_keeps_the_graph_connected():
    hid, w, b, ids, _, _ = make(torch.float32)
    logp = chunked_lm_head_logprobs(hid, w, ids, bias=b, mask=torch.zeros(ids.shape))
    assert (logp == 0).all()
    g_h, g_w = torch.autograd.grad(logp.sum(), (hid, w))
    assert (g_h == 0).all() and (g_w == 0).all()


def test_only_weight_gradient_requested_and_frozen_hidden():
    hid, w, b, ids, wl, _ = make(F64, bias=False)
    h0 = hid.detach()
    logp = chunked_lm_head_logprobs(h0, w, ids, chunk_rows=4)
    (g,) = torch.autograd.grad((logp * wl).sum(), (w,))
    ref, _ = naive(h0, w, None, ids, 1.0)
    (r,) = torch.autograd.grad((ref * wl).sum(), (w,))
    torch.testing.assert_close(g, r, **tol(F64))


def test_gradcheck_float64():
    hid, w, b, ids, _, _ = make(F64, n=2, t=3, h=4, v=6)

    def fn(h, w_, b_):
        lp, en = chunked_lm_head_logprobs(h, w_, ids, bias=b_, temperature=0.7, chunk_rows=4, return_entropy=True)
        return lp, en

    assert torch.autograd.gradcheck(fn, (hid, w, b))


def test_bfloat16_runs_and_is_close():
    hid, w, b, ids, _, _ = make(torch.float32, bias=False)
    lp16 = chunked_lm_head_logprobs(hid.detach().bfloat16(), w.detach().bfloat16(), ids)
    assert lp16.dtype == torch.float32
    ref, _ = naive(hid.detach(), w.detach(), None, ids, 1.0)
    torch.testing.assert_close(lp16, ref, rtol=0.05, atol=0.1)


def test_bad_shapes_are_rejected():
    hid, w, b, ids, _, _ = make(torch.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_lm_head_logprobs(hid, w, ids[:, :-1])
    with pytest.raises(ValueError, match="must be \\[V, H\\]"):
        chunked_lm_head_logprobs(hid, w.t(), ids)
    with pytest.raises(ValueError, match="temperature"):
        chunked_lm_head_logprobs(hid, w, ids, temperature=0.0)
    with pytest.raises(ValueError, match="bias"):
        chunked_lm_head_logprobs(hid, w, ids, bias=b[:-1])


# ----------------------------------------------------------------------------- in PolicyOptModule
def _module(model, chunked, temperature=0.8):
    from rlopt.algorithms import build_preset
    from rlopt.logprobs import CompletionLogProbs
    from rlopt.module import PolicyOptModule
    from rlopt.rewards import RewardSet, partial_match
    from rlopt.rollout import HFGenerate
    from rlopt.tiny import build_tokenizer

    adv, obj = build_preset("grpo")
    return PolicyOptModule(model, build_tokenizer(), adv, obj, RewardSet({"m": partial_match}),
                           rollout=HFGenerate(temperature=temperature, max_new_tokens=6), group_size=2,
                           logprobs=CompletionLogProbs(temperature, chunked_lm_head=chunked, chunk_rows=5))


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlopt.tiny import build_tokenizer

    v = len(build_tokenizer())
    common = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    untied = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    return {"llama_tied": tied, "qwen2_untied": untied}


@pytest.mark.parametrize("name", ["llama_tied", "qwen2_untied"])
def test_module_logprobs_entropy_and_gradients_match_with_chunked_head_on_and_off(name):
    model = _models()[name].double()
    on, off = _module(model, True), _module(model, False)
    prompts = ["abc>", "fedcba>", "a>"]
    torch.manual_seed(3)
    ro = off.sample(prompts, 2)  # left-padded prompts, right-padded completions
    assert (ro.completion_mask == 0).any() or ro.truncated.all()
    m = ro.completion_mask.bool()
    w = torch.randn(m.shape, dtype=torch.float64)
    results = []
    for mod in (off, on):
        model.zero_grad(set_to_none=True)
        logp, ent = mod.completion_logprobs(model, ro, with_entropy=True)
        ((logp * w * m).sum() + 0.3 * (ent * m).sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), ent.detach(), grads))
    (lp0, e0, g0), (lp1, e1, g1) = results
    torch.testing.assert_close(lp1[m], lp0[m], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e1[m], e0[m], rtol=1e-10, atol=1e-10)
    assert (lp1[~m] == 0).all()
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-10, msg=k)


def test_module_chunked_head_float32_within_1e5():
    model = _models()["llama_tied"]
    on, off = _module(model, True, temperature=1.0), _module(model, False, temperature=1.0)
    torch.manual_seed(1)
    ro = off.sample(["abcd>", "ab>"], 3)
    m = ro.completion_mask.bool()
    lp0, _ = off.completion_logprobs(model, ro)
    lp1, _ = on.completion_logprobs(model, ro)
    torch.testing.assert_close(lp1[m], lp0[m].detach(), rtol=1e-5, atol=1e-5)


def test_split_refuses_softcapped_logits():
    from rlopt.algorithms.lm_head import split_causal_lm

    model = _models()["llama_tied"]
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        split_causal_lm(model)


@pytest.mark.parametrize("chunked", [False, True])
def test_all_padding_columns_are_skipped_without_changing_logprobs(chunked):
    """completion_logprobs drops columns that are padding in every row (module._trim_padding):
    extra all-pad columns on either side change neither the values nor the gradients."""
    import dataclasses

    from rlopt.logprobs import by_length as _by_length, trim_padding as _trim_padding

    model = _models()["llama_tied"].double()
    mod = _module(model, chunked)
    torch.manual_seed(2)
    ro = mod.sample(["abc>", "ab>"], 2)
    pad = lambda x, left, right: torch.nn.functional.pad(x, (left, right))  # noqa: E731
    wide = dataclasses.replace(ro, prompt_ids=pad(ro.prompt_ids, 3, 0), prompt_mask=pad(ro.prompt_mask, 3, 0),
                               completion_ids=pad(ro.completion_ids, 0, 4),
                               completion_mask=pad(ro.completion_mask, 0, 4))
    assert _trim_padding(wide).input_ids.shape == _trim_padding(ro).input_ids.shape
    m = ro.completion_mask.bool()
    grads = []
    for r in (ro, wide):
        model.zero_grad(set_to_none=True)
        logp, ent = mod.completion_logprobs(model, r, with_entropy=True)
        t = ro.completion_ids.shape[1]
        assert logp.shape == r.completion_ids.shape
        assert (logp[:, t:] == 0).all()
        ((logp[:, :t] * m).sum() + (ent[:, :t] * m).sum()).backward()
        grads.append((logp[:, :t][m].detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    rows = torch.arange(ro.completion_ids.shape[0])
    order = _by_length(rows, ro, micro=2)
    assert sorted(order.tolist()) == rows.tolist()
    assert torch.equal(_by_length(rows, ro, micro=100), rows)
    grouped = _by_length(rows, ro, micro=2, group_size=2).tolist()  # groups {0, 1} and {2, 3} stay whole
    assert sorted(grouped) == rows.tolist() and {frozenset(grouped[:2]), frozenset(grouped[2:])} == {
        frozenset({0, 1}), frozenset({2, 3})}
