"""Shared-prefix decode attention (rlopt/rollout/prefix_cache.py): the G samples of a prompt read its
cache once. Checked against a naive float64 attention over the repeated cache, and end to end
against the sampler's repeated layout (same tokens, same random stream, same sampler log-probs)."""

import pytest
import torch

from rlopt.rollout import prefix_cache
from rlopt.rollout.lean import KVCacheSampler

PROMPTS = ["abc>", "fedcba>", "a>"]  # different lengths: left padding


def _naive(q, kp, vp, kc, vc, prompt_mask, slots, groups, scale):
    """Row by row, from the formula: row s (prompt s // G) attends to its prompt's real keys and its
    own tokens; one softmax over both. q [n, H, 1, d]; kp/vp [B, Hkv, P, d]; kc/vc [n, Hkv, t, d]."""
    n, h, _, d = q.shape
    hkv = kp.shape[1]
    out = torch.zeros(n, 1, h, d, dtype=q.dtype)
    for i, s in enumerate(slots.tolist()):
        b = s // groups
        real = prompt_mask[b].bool()
        for head in range(h):
            j = head // (h // hkv)  # the KV head this query head reads (grouped-query attention)
            keys = torch.cat([kp[b, j][real], kc[i, j]])  # [P_real + t, d]
            vals = torch.cat([vp[b, j][real], vc[i, j]])
            w = torch.softmax(keys @ q[i, head, 0] * scale, dim=0)
            out[i, 0, head] = w @ vals
    return out


class _Attn(torch.nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("pruned", [False, True])
def test_attend_equals_naive_float64(hkv, pruned):
    torch.manual_seed(0)
    b, g, h, p, t, d = 3, 4, 4, 5, 3, 8
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding
    layer = prefix_cache._prefix_layer_class()(capacity=t)
    kp, vp = torch.randn(b, hkv, p, d, dtype=torch.float64), torch.randn(b, hkv, p, d, dtype=torch.float64)
    layer.update(kp, vp)  # the prefill: the prompts' cache, once
    slots = torch.tensor([0, 2, 3, 5, 9, 11]) if pruned else torch.arange(b * g)
    n = slots.numel()
    kc, vc = torch.randn(n, hkv, t, d, dtype=torch.float64), torch.randn(n, hkv, t, d, dtype=torch.float64)
    state = prefix_cache.PrefixState([layer], g, torch.zeros(b, 1, 1, p, dtype=torch.float64).masked_fill(
        prompt_mask[:, None, None, :] == 0, float("-inf")), rows=slots if pruned else None)
    q = torch.randn(n, h, 1, d, dtype=torch.float64)
    out, _ = prefix_cache.attend(_Attn(), q, kc, vc, None, scaling=0.3, rlopt_prefix=state)
    torch.testing.assert_close(out, _naive(q, kp, vp, kc, vc, prompt_mask, slots, g, 0.3), rtol=1e-12, atol=1e-12)
    assert state.calls == 1


@pytest.fixture(scope="module")
def tiny64():
    """A float64 tiny Llama with grouped-query attention (4 heads, 2 KV heads), briefly warmed up so
    rows end at different steps (pruning then drops rows, and slots matter)."""
    from tests.conftest import warmed_tiny_llama

    model, tok = warmed_tiny_llama(intermediate_size=128, num_key_value_heads=2)
    model = model.double()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return model, tok, enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("prune_below", [0.9, 0.0])
def test_shared_and_repeated_sample_the_same(tiny64, seed, prune_below):
    model, tok, ids, mask = tiny64
    outs = []
    for mode in ("repeated", "shared"):
        torch.manual_seed(seed)
        engine = KVCacheSampler(max_new_tokens=20, prefix_attention=mode, prune_below=prune_below)
        ro = engine.generate(model, ids, mask, 6, eos_token_id=tok.eos_token_id, pad_token_id=0)
        outs.append((ro, torch.get_rng_state(), engine.last_row_steps))
    (a, sa, wa), (b, sb, wb) = outs
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(sa, sb)
    torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=0, atol=1e-12)
    lens = a.completion_mask.sum(-1)
    assert lens.min() < lens.max() and wa == wb  # rows finished at different steps; pruning alike
    assert model.config._attn_implementation == "sdpa"  # switched back


def test_choices_and_refusals(tiny64):
    model, tok, ids, mask = tiny64
    with pytest.raises(ValueError, match="rollout.prefix_attention='cascade'.*auto, repeated, shared"):
        KVCacheSampler(prefix_attention="cascade")
    for kw in (dict(share_prefill=False), dict(cache="dynamic")):
        with pytest.raises(ValueError, match="rollout.prefix_attention=shared needs"):
            KVCacheSampler(prefix_attention="shared", **kw).generate(model, ids, mask, 2, tok.eos_token_id, 0)
    one = KVCacheSampler(prefix_attention="shared", max_new_tokens=3).generate(model, ids, mask, 1, tok.eos_token_id, 0)
    assert one.completion_ids.shape[0] == ids.shape[0]  # one sample a prompt: nothing to share, no refusal
    model.config._attn_implementation = "flash_attention_2"  # not one it takes (fits() reads the config)
    try:
        assert not prefix_cache.fits(model)
    finally:
        model.config._attn_implementation = "sdpa"
    assert prefix_cache.fits(model)


def test_a_layer_that_skipped_it_is_an_error():
    """check_served after the first decode step: every layer must have run the shared-prefix attention."""
    state = prefix_cache.PrefixState([object(), object()], 2, torch.zeros(1, 1, 1, 1), calls=1)
    with pytest.raises(RuntimeError, match="1 of 2 attention layers.*prefix_attention=repeated"):
        prefix_cache.check_served(state, torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="without its state"):
        prefix_cache.attend(_Attn(), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), None)
    with pytest.raises(ValueError, match="one new position a row"):
        prefix_cache.attend(_Attn(), torch.zeros(2, 1, 2, 1), torch.zeros(2, 1, 2, 1), torch.zeros(2, 1, 2, 1), None,
                            rlopt_prefix=state)


def test_auto_rule():
    """pays: repeated prompt cache of one layer = 2 (K, V) * N * Hkv * P * d * 4 bytes >= 2 MiB.
    tiny (16 prompts x 8, 4 heads of 16, prompts ~7): 2*128*4*7*16*4 = 0.44 MiB -> repeated;
    small (8 x 8, 6 heads of 64, prompts ~45): 2*64*6*45*64*4 = 8.4 MiB -> shared."""
    from types import SimpleNamespace

    tiny = SimpleNamespace(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, head_dim=None)
    small = SimpleNamespace(num_attention_heads=6, num_key_value_heads=6, hidden_size=384, head_dim=None)
    assert not prefix_cache.pays(torch.ones(16, 7), 8, tiny)
    assert prefix_cache.pays(torch.ones(8, 45), 8, small)
    assert not prefix_cache.pays(torch.ones(8, 10), 8, small)  # 1.9 MiB
    assert not prefix_cache.pays(torch.ones(8, 45, device="meta"), 8, small)  # not measured off the CPU


def test_shared_prefix_config_trains(tmp_path):
    """rollout.prefix_attention=shared through the Hydra config and two training steps of the main job."""
    import math

    from tests.conftest import compose_train, fit

    module, _, trainer = fit(compose_train(tmp_path, ["rollout.prefix_attention=shared"]))
    assert module.rollout.prefix_attention == "shared" and trainer.global_step == 2
    assert all(math.isfinite(v) for v in module.history[-1].values())
