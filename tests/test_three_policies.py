"""The sampler mu beside pi_old and pi_theta: the engines' log-probs of the drawn tokens, the
mismatch metrics, a sampler in another dtype, and the correction / mask axes in training."""

from __future__ import annotations

import math

import pytest
import torch

from rlopt.algorithms.mismatch import finish_mismatch, mismatch_stats
from rlopt.logprobs import CompletionLogProbs
from rlopt.rollout import HFGenerate, KVCacheSampler

from .conftest import compose_train
from .test_sampler import PROMPTS, tiny  # noqa: F401 - the warmed-up tiny model fixture


def _fresh_logp(model, ro, temperature, top_k=0, top_p=1.0):
    """log softmax of a plain float32 forward, with the sampler's own truncation renormalised."""
    from rlopt.rollout.lean import warp_logits

    ids, attn = ro.input_ids, ro.attention_mask
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    t = ro.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -(t + 1):-1].float()
    n, _, v = logits.shape
    warped = warp_logits(logits.reshape(n * t, v), temperature, top_k, top_p).reshape(n, t, v)
    return torch.log_softmax(warped, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)  # [N, T]


@pytest.mark.parametrize("engine", ["hf_generate", "lean"])
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.3, top_p=0.8),
                                dict(temperature=1.0, top_k=5)], ids=["t1", "t0.7", "t1.3-top_p", "top_k"])
def test_sampler_logp_equals_a_fresh_forward(tiny, engine, kw):  # noqa: F811
    model, tok, ids, mask = tiny
    cls = HFGenerate if engine == "hf_generate" else KVCacheSampler
    torch.manual_seed(3)
    ro = cls(max_new_tokens=10, **kw).generate(model, ids, mask, 4, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    assert ro.sampler_logp is not None and ro.sampler_logp.shape == ro.completion_ids.shape
    want = _fresh_logp(model, ro, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0))
    m = ro.completion_mask.bool()
    assert torch.allclose(ro.sampler_logp[m], want[m], atol=1e-5, rtol=0), (ro.sampler_logp[m] - want[m]).abs().max()
    assert (ro.sampler_logp[~m] == 0).all()
    if kw.get("top_p", 1.0) < 1 or kw.get("top_k", 0):  # truncation renormalises: mu >= the untruncated probability
        plain = _fresh_logp(model, ro, kw["temperature"])
        assert (ro.sampler_logp[m] >= plain[m] - 1e-6).all() and (ro.sampler_logp[m] > plain[m] + 1e-4).any()


def test_greedy_has_no_sampler_logp(tiny):  # noqa: F811
    model, tok, ids, mask = tiny
    for cls in (HFGenerate, KVCacheSampler):
        ro = cls(max_new_tokens=4).generate(model, ids, mask, 1, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, greedy=True)
        assert ro.sampler_logp is None


def test_the_training_logprobs_equal_the_sampler_logprobs_on_policy(tiny):  # noqa: F811
    """Same weights, same dtype, no truncation: mu == pi_old up to float rounding, so every mismatch
    metric is ~0 (what a float32 sampler must show)."""
    model, tok, ids, mask = tiny
    torch.manual_seed(5)
    ro = KVCacheSampler(max_new_tokens=8, temperature=0.9).generate(model, ids, mask, 3, eos_token_id=tok.eos_token_id,
                                                                    pad_token_id=tok.pad_token_id)
    old, _ = CompletionLogProbs(temperature=0.9)(model, ro)
    stats = finish_mismatch(mismatch_stats(old, ro.sampler_logp, ro.completion_mask), lambda t: t, lambda t: t)
    assert stats["mismatch/logp_abs_diff_max"] < 1e-5 and abs(stats["mismatch/ppl_ratio"] - 1) < 1e-5


def test_mismatch_metrics_hand_values():
    # one sequence of two tokens, one of one token, one empty (padding holds junk)
    # x = log pi_old - log mu = [ln 2, -ln 2] | [ln 4] | []
    mu = torch.tensor([[-1.0, -2.0], [-3.0, 0.0], [0.0, 0.0]])
    old = mu + torch.tensor([[math.log(2), -math.log(2)], [math.log(4), float("nan")], [float("inf"), 5.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    s = finish_mismatch(mismatch_stats(old, mu, mask), lambda t: t, lambda t: t)
    ln2 = math.log(2)
    # k1 = mean(-x) = -(ln2 - ln2 + 2 ln2) / 3
    assert s["mismatch/kl_k1"] == pytest.approx(-2 * ln2 / 3)
    # k3 = mean(r - 1 - x): r = 2, 1/2, 4 -> (1 - ln2) + (-0.5 + ln2) + (3 - 2 ln2) = 3.5 - 2 ln2
    assert s["mismatch/kl_k3"] == pytest.approx((3.5 - 2 * ln2) / 3)
    assert s["mismatch/logp_abs_diff_mean"] == pytest.approx(4 * ln2 / 3)
    assert s["mismatch/logp_abs_diff_max"] == pytest.approx(2 * ln2)
    # ppl ratio per sequence exp(-mean x): seq 1: exp(0) = 1; seq 2: exp(-ln 4) = 1/4 -> mean 5/8
    assert s["mismatch/ppl_ratio"] == pytest.approx(5 / 8)
    # chi2 token: mean(r^2) - 1 = (4 + 1/4 + 16) / 3 - 1
    assert s["mismatch/chi2_token"] == pytest.approx((4 + 0.25 + 16) / 3 - 1)
    # chi2 seq: mean((prod r)^2) - 1: seq 1 prod 1, seq 2 prod 4 -> (1 + 16) / 2 - 1
    assert s["mismatch/chi2_seq"] == pytest.approx((1 + 16) / 2 - 1)


def _fit(tmp_path, *overrides):
    from rlopt.train import build

    cfg = compose_train(tmp_path, ["debug=default", "logger=none", "callbacks=none", "export_dir=null",
                                   "steps=3", "data.batch_size=4", *overrides])
    module, dm, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)
    return module


def test_bfloat16_sampler_makes_a_measured_mismatch_and_tis_trains(tmp_path):
    module = _fit(tmp_path, "algorithm=grpo_tis", "rollout.dtype=bfloat16")
    h = module.history[-1]
    assert module.behaviour.copy.model is not None and next(module.behaviour.copy.model.parameters()).dtype == torch.bfloat16
    assert next(module.policy.parameters()).dtype == torch.float32  # the trainer stays float32
    assert h["mismatch/logp_abs_diff_max"] > 1e-4  # bfloat16 rounding shows
    for key in ("mismatch/kl_k1", "mismatch/kl_k3", "mismatch/chi2_token", "mismatch/chi2_seq", "mismatch/ppl_ratio",
                "correction/weight_mean", "correction/ess_token", "correction/token_frac_high"):
        assert key in h and math.isfinite(h[key]), key
    # every TensorBoard chart of the layout's mismatch / correction category shows a logged tag
    import re

    from rlopt.callbacks import clip_fraction_layout

    charts = clip_fraction_layout()["sampler mismatch, behaviour correction, token masks"]
    for title, (_, tags) in charts.items():
        if not title.startswith("token masks"):
            for tag in tags:
                assert any(re.fullmatch(tag.strip("^$"), k) for k in h), (title, tag)


def test_float32_sampler_on_policy_logs_zero_mismatch(tmp_path):
    h = _fit(tmp_path).history[-1]  # the default: same weights, no truncation, one update per rollout
    assert h["mismatch/logp_abs_diff_max"] < 1e-4 and abs(h["mismatch/kl_k1"]) < 1e-5


def test_masks_and_bypass_train_and_log(tmp_path):
    h = _fit(tmp_path, "algorithm=grpo", "masks=[truncated,entropy_80_20]", "num_minibatches=2").history[-1]
    assert "mask/high_entropy_frac" in h and "mask/truncated_frac" in h
    assert 0.0 <= h["mask/high_entropy_frac"] <= 1.0
    h = _fit(tmp_path, "algorithm=grpo", "correction=bypass", "num_minibatches=2").history[-1]
    assert math.isfinite(h["loss/total"])


def test_a_correction_without_sampler_logprobs_is_a_clear_error(tmp_path):
    from rlopt.train import build

    cfg = compose_train(tmp_path, ["debug=default", "logger=none", "callbacks=none", "algorithm=grpo_tis"])
    module, dm, trainer = build(cfg)
    module.make_completions = lambda batch: _greedy(module, batch)
    with pytest.raises(ValueError, match="sampler's log-probs"):
        trainer.fit(module, datamodule=dm)


def _greedy(module, batch):
    ro = module.sample(batch["prompt"], module.group_size, greedy=True)  # greedy: no sampler log-probs
    return ro, module.decode(ro)


def test_staleness_samples_with_the_weights_of_k_updates_ago(tmp_path):
    # 2 optimizer updates per rollout step: versions 0 -> 2 -> 4; staleness 1 samples with 0, 1, 3
    module = _fit(tmp_path, "offpolicy.staleness=1", "num_minibatches=2")
    assert [h["offpolicy/staleness_max"] for h in module.history] == [0.0, 1.0, 1.0]
    assert module.behaviour.version == 6 and [v for v, _ in module.behaviour.stale.snapshots] == [5, 6]
    stale = module.history[-1]["mismatch/logp_abs_diff_max"]  # mu: the weights one update old; pi_old: current
    fresh = _fit(tmp_path, "num_minibatches=2").history[-1]["mismatch/logp_abs_diff_max"]
    assert stale > 1e-3 and fresh < 1e-4, (stale, fresh)
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)  # the snapshots travel with the checkpoint (exact resume)
    assert ckpt["rlopt"]["behaviour"]["version"] == 6
    assert [v for v, _ in ckpt["rlopt"]["behaviour"]["stale"]["snapshots"]] == [5, 6]


def test_staleness_zero_is_the_default_run(tmp_path):
    a = _fit(tmp_path, "num_minibatches=2").history
    b = _fit(tmp_path, "num_minibatches=2", "offpolicy.staleness=0").history
    strip = [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in (a[-1], b[-1])]
    assert strip[0] == strip[1] and a[-1]["offpolicy/staleness_max"] == 0.0


def test_sampler_logp_switch_skips_the_recording(tiny):  # noqa: F811
    model, tok, ids, mask = tiny
    for cls in (HFGenerate, KVCacheSampler):
        torch.manual_seed(1)
        ro = cls(max_new_tokens=4, sampler_logp=False).generate(model, ids, mask, 2, eos_token_id=tok.eos_token_id,
                                                                 pad_token_id=tok.pad_token_id)
        assert ro.sampler_logp is None and ro.completion_ids.shape[0] == 2 * len(PROMPTS)
