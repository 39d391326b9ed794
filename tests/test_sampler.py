"""KVCacheSampler (rlopt/rollout/lean.py): the same tokens as transformers' generate on the same seed."""

import math

import pytest
import torch

from rlopt.rollout import HFGenerate
from rlopt.rollout.lean import KVCacheSampler, warp_logits

PROMPTS = ["abc>", "fedcba>", "a>", "bbbb>"]  # different lengths: left padding


@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama with a few steps of supervised warm-up, so rows end with EOS at different
    steps (finished rows must emit pad, and the loop must stop when all rows have finished)."""
    from tests.conftest import warmed_tiny_llama

    model, tok = warmed_tiny_llama()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return model, tok, enc["input_ids"], enc["attention_mask"]


def _both(tiny, greedy=False, seed=7, samples=4, max_new_tokens=12, cache="dynamic", eos=None, **kw):
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id if eos is None else eos
    out = []
    for engine in (HFGenerate(max_new_tokens=max_new_tokens, **kw),
                   KVCacheSampler(max_new_tokens=max_new_tokens, cache=cache, **kw)):
        torch.manual_seed(seed)
        ro = engine.generate(model, ids, mask, samples, eos_token_id=eos, pad_token_id=tok.pad_token_id, greedy=greedy)
        out.append((ro, torch.get_rng_state()))
    return out


def _assert_same(a, b):
    (ra, sa), (rb, sb) = a, b
    assert torch.equal(ra.completion_ids, rb.completion_ids)
    assert torch.equal(ra.completion_mask, rb.completion_mask)
    assert torch.equal(ra.truncated, rb.truncated)
    assert torch.equal(ra.prompt_ids, rb.prompt_ids) and torch.equal(ra.prompt_mask, rb.prompt_mask)
    assert torch.equal(sa, sb), "the random stream advanced differently"


SETTINGS = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.3),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(top_k=1),
    dict(temperature=0.7, top_k=10, top_p=0.9),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("seed", [0, 7])
def test_sampled_tokens_are_identical_to_generate(tiny, kw, seed):
    a, b = _both(tiny, seed=seed, **kw)
    _assert_same(a, b)


def test_rows_finish_early_and_pad_and_the_loop_stops(tiny):
    (ra, _), (rb, _) = _both(tiny, seed=3, samples=6, max_new_tokens=30)
    _assert_same((ra, torch.zeros(1)), (rb, torch.zeros(1)))
    lens = rb.completion_mask.sum(-1)
    assert (~rb.truncated).all() and lens.min() < lens.max()  # rows stop at different steps
    assert rb.completion_ids.shape[1] == int(lens.max()) < 30  # stopped when all had finished
    assert (rb.completion_ids[rb.completion_mask == 0] == 0).all()  # pad after EOS


@pytest.mark.parametrize("kw", [dict(), dict(top_p=0.5)])
def test_greedy_is_identical_to_generate(tiny, kw):
    a, b = _both(tiny, greedy=True, **kw)
    _assert_same(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=6)])
def test_min_new_tokens_same_tokens_as_generate(tiny, kw):
    """rollout.min_new_tokens: EOS suppressed for the first k tokens, exactly as generate's processor."""
    free = _both(tiny, seed=3, samples=6, max_new_tokens=12, **kw)[1][0].completion_mask.sum(-1)
    assert free.min() <= 4  # without it some completions end within 4 tokens (EOS included)
    a, b = _both(tiny, seed=3, samples=6, max_new_tokens=12, min_new_tokens=4, **kw)
    _assert_same(a, b)
    assert b[0].completion_mask.sum(-1).min() >= 5  # EOS first drawable as the 5th token
    model, tok, ids, mask = tiny
    fixed = KVCacheSampler(max_new_tokens=7, min_new_tokens=7).generate(model, ids, mask, 3, tok.eos_token_id, 0)
    assert fixed.truncated.all() and fixed.completion_mask.all() and fixed.completion_ids.shape[1] == 7
    with pytest.raises(ValueError, match="rollout.min_new_tokens"):
        KVCacheSampler(max_new_tokens=4, min_new_tokens=5)


def test_eos_as_list_and_no_eos(tiny):
    _, tok, _, _ = tiny
    a, b = _both(tiny, eos=[tok.eos_token_id, tok.convert_tokens_to_ids("a")], max_new_tokens=10)
    _assert_same(a, b)
    model, tok, ids, mask = tiny
    torch.manual_seed(0)
    ro = KVCacheSampler(max_new_tokens=5).generate(model, ids, mask, 2, eos_token_id=None, pad_token_id=0)
    assert ro.completion_ids.shape == (8, 5) and ro.truncated.all() and ro.completion_mask.all()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_stock_caches_sample_the_same_tokens(tiny, cache):
    a, b = _both(tiny, seed=1, cache=cache, temperature=0.7)
    _assert_same(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_finished_rows_changes_nothing(tiny, seed):
    """Dropping finished rows from the batch keeps the tokens and the random stream."""
    model, tok, ids, mask = tiny
    outs, work = [], []
    for prune in (False, True):
        torch.manual_seed(seed)
        engine = KVCacheSampler(max_new_tokens=30, prune_finished=prune, prune_below=0.9)
        ro = engine.generate(model, ids, mask, 6, eos_token_id=tok.eos_token_id, pad_token_id=0)
        outs.append((ro, torch.get_rng_state()))
        work.append(engine.last_row_steps)
    _assert_same(*outs)
    assert work[1] < work[0]  # rows were dropped


@pytest.mark.parametrize("seed", [0, 4])
def test_shared_prefill_runs_each_prompt_once_and_changes_nothing(tiny, seed):
    """share_prefill: the prefill sees the B distinct prompts (not B*G rows); same tokens, same stream."""
    model, tok, ids, mask = tiny
    outs, first_batch = [], []
    hook = model.register_forward_pre_hook(lambda m, a, kw: first_batch.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        for share in (False, True):
            first_batch.clear()
            torch.manual_seed(seed)
            engine = KVCacheSampler(max_new_tokens=12, share_prefill=share)
            ro = engine.generate(model, ids, mask, 5, eos_token_id=tok.eos_token_id, pad_token_id=0)
            outs.append((ro, torch.get_rng_state()))
            assert first_batch[0] == (ids.shape[0] * (1 if share else 5), ids.shape[1])  # the prefill call
    finally:
        hook.remove()
    _assert_same(*outs)


def test_no_padding_prompts_and_model_mode_restored(tiny):
    model, tok, _, _ = tiny
    enc = tok(["abc>", "cba>"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].all()
    outs = []
    for engine in (HFGenerate(max_new_tokens=8), KVCacheSampler(max_new_tokens=8)):
        model.train()
        torch.manual_seed(2)
        outs.append(engine.generate(model, enc["input_ids"], enc["attention_mask"], 3, eos_token_id=tok.eos_token_id,
                                    pad_token_id=0).completion_ids)
        assert model.training
    model.eval()
    assert torch.equal(outs[0], outs[1])


def test_first_token_distribution_chi_square(tiny):
    """Independent of generate: first-token frequencies over many samples follow the warped softmax."""
    model, tok, ids, mask = tiny
    kw = dict(temperature=0.8, top_k=12, top_p=0.95)
    with torch.no_grad():
        logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].float()
    p = warp_logits(logits[None], **kw).softmax(-1)[0]  # [V]
    torch.manual_seed(0)
    n = 4000
    ro = KVCacheSampler(max_new_tokens=1, **kw).generate(model, ids[:1], mask[:1], n, eos_token_id=None, pad_token_id=0)
    counts = torch.bincount(ro.completion_ids[:, 0], minlength=p.numel()).double()
    support = p > 0
    assert counts[~support].sum() == 0  # nothing outside top-k / top-p
    exp = n * p[support].double()
    keep = exp >= 5  # pool the rare cells
    obs = torch.cat([counts[support][keep], counts[support][~keep].sum()[None]])
    ex = torch.cat([exp[keep], exp[~keep].sum()[None]])
    if ex[-1] < 1e-9:
        obs, ex = obs[:-1], ex[:-1]
    chi2 = float(((obs - ex) ** 2 / ex).sum())
    dof = obs.numel() - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # far beyond the 99.9% quantile


def test_warp_logits_rules():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]])
    k = warp_logits(s, top_k=2)  # the 2nd largest is 3.0: both tied 3.0 kept, nothing else
    assert torch.isinf(k).tolist() == [[True, False, False, True, True]]
    p = warp_logits(s, top_p=1e-6)  # always keeps the most likely token
    assert torch.isfinite(p).sum() == 1
    torch.testing.assert_close(warp_logits(s, temperature=0.5), s / 0.5)


def test_bad_cache_name():
    with pytest.raises(ValueError, match="rollout.cache"):
        KVCacheSampler(cache="paged")


def test_lean_rollout_config_trains(tmp_path):
    from tests.conftest import compose_train, fit

    cfg = compose_train(tmp_path, ["rollout=lean"])
    assert cfg.rollout._target_ == "rlopt.rollout.lean.KVCacheSampler"
    module, _, trainer = fit(cfg)
    assert isinstance(module.rollout, KVCacheSampler) and trainer.global_step == 2


def test_chunked_lm_head_config_trains(tmp_path):
    from tests.conftest import compose_train, fit

    cfg = compose_train(tmp_path, ["chunked_lm_head=true", "rollout=lean"])
    module, _, trainer = fit(cfg)
    assert module.logprobs.chunked_lm_head and trainer.global_step == 2
    assert all(math.isfinite(v) for v in module.history[-1].values())


def test_performance_keys_reach_the_module_and_bad_values_are_named(tmp_path):
    """share_prompt, lm_head_saved_mib, rollout.share_prefill and rollout.prefix_attention: config -> module; a negative
    lm_head_saved_mib names the key."""
    from rlopt.train import build
    from tests.conftest import compose_train, fit

    cfg = compose_train(tmp_path, ["chunked_lm_head=true", "lm_head_saved_mib=64", "share_prompt=false",
                                   "rollout.share_prefill=false", "rollout.prefix_attention=repeated"])
    module, _, trainer = fit(cfg)
    assert module.logprobs.saved_mib == 64.0 and not module.logprobs.share_prompt and not module.rollout.share_prefill
    assert trainer.global_step == 2 and module.rollout.prefix_attention == "repeated"
    default = build(compose_train(tmp_path / "d"))[0]
    assert default.logprobs.share_prompt and default.logprobs.saved_mib == 0.0 and default.rollout.share_prefill
    assert default.rollout.prefix_attention == "auto"
    with pytest.raises(ValueError, match="lm_head_saved_mib"):
        build(compose_train(tmp_path / "bad", ["lm_head_saved_mib=-1"]))
