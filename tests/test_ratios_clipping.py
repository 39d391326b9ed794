"""Ratio schemes and clipping strategies: identities and hand-derived cases."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from rlopt.algorithms import (
    NoClip, PolicyObjective, PPOClip, ProductRatio, SequenceRatio, SequenceTokenRatio, TokenRatio,
    WeightClip,
)

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)
RATIOS = {"token": TokenRatio, "sequence": SequenceRatio, "sequence_token": SequenceTokenRatio,
          "product": ProductRatio}
CLIPS = {
    "ppo": lambda: PPOClip(0.2),
    "ppo_asym_dual_delta": lambda: PPOClip(0.1, 0.15, dual_clip=2.0, delta=1.5),
    "weight": lambda: WeightClip(0.2, 0.28),
    "weight_no_low": lambda: WeightClip(None, 0.28),
    "none": NoClip,
}
AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def batch(seed, n=4, t=6, spread=0.4, min_len=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]).to(F64)
    old = -torch.rand(n, t, generator=g, dtype=F64) * 3 - 0.1
    logp = old + spread * torch.randn(n, t, generator=g, dtype=F64)
    return logp, old, mask


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# --- ratio schemes -----------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.tuples(st.floats(-8, -0.01), st.floats(-8, -0.01)), min_size=1, max_size=6))
def test_sequence_ratios_on_one_token_sequences_equal_token_ratio(pairs):
    new = torch.tensor([[a] for a, _ in pairs], dtype=F64)
    old = torch.tensor([[b] for _, b in pairs], dtype=F64)
    mask = torch.ones_like(new)
    adv = torch.linspace(-1, 1, len(pairs), dtype=F64)[:, None]
    x = new.clone().requires_grad_(True)
    ref_r, _ = TokenRatio()(x, old, mask)
    ref_g = grad_of((ref_r * adv).sum(), x)
    for scheme in (SequenceRatio(), SequenceTokenRatio(), ProductRatio()):
        r, lr = scheme(x, old, mask)
        torch.testing.assert_close(r, ref_r.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(lr, (new - old), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad_of((r * adv).sum(), x), ref_g, rtol=1e-12, atol=1e-15)


def test_ratio_values_by_definition():
    logp, old, mask = batch(0)
    for name, cls in RATIOS.items():
        r, lr = cls()(logp, old, mask)
        assert r.dtype == F64
        for i in range(logp.shape[0]):
            toks = [j for j in range(logp.shape[1]) if mask[i, j]]
            d = [logp[i, j].item() - old[i, j].item() for j in toks]
            for j in range(logp.shape[1]):
                if not mask[i, j]:
                    assert r[i, j].item() == 1.0 and lr[i, j].item() == 0.0  # padding
                    continue
                exp = {"token": d[toks.index(j)], "sequence": sum(d) / len(d),
                       "sequence_token": sum(d) / len(d), "product": sum(d)}[name]
                assert lr[i, j].item() == pytest.approx(exp, rel=1e-12, abs=1e-14)
                assert r[i, j].item() == pytest.approx(math.exp(exp), rel=1e-12)


def test_log_ratio_is_clamped_and_old_logp_gets_no_gradient():
    logp = torch.tensor([[0.0, -1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-50.0, -1.5]], dtype=F64, requires_grad=True)
    r, lr = TokenRatio(max_log_ratio=20.0)(logp, old, torch.ones(1, 2))
    # token 1: log-ratio 50 clamped to 20; token 2: 0.5
    assert lr.tolist() == [[20.0, 0.5]]
    r.sum().backward()
    assert old.grad is None or (old.grad == 0).all()
    # the clamp stops the gradient of the far off-policy token; exp(0.5) for the other
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(math.exp(0.5))


def test_sequence_token_ratio_gradient_is_per_token():
    # value s_i on every token; d r_t / d logp_t' = s_i * [t == t'] (no cross-token flow)
    logp, old, mask = batch(1)
    x = logp.clone().requires_grad_(True)
    r, _ = SequenceTokenRatio()(x, old, mask)
    s, _ = SequenceRatio()(logp, old, mask)
    torch.testing.assert_close(r.detach(), s)
    i, j = 0, 0
    g = grad_of(r[i, j], x)
    exp = torch.zeros_like(g)
    exp[i, j] = s[i, j]
    torch.testing.assert_close(g, exp)


# --- GSPO-token == GSPO with per-sequence advantages --------------------------------------------

@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("agg", AGGS)
def test_gspo_token_equals_gspo_for_sequence_constant_advantage(clip, agg):
    for seed in range(3):
        logp, old, mask = batch(seed, spread=0.3)
        a = torch.tensor([1.3, -0.7, 0.4, -2.0], dtype=F64)[:, None] * mask
        out = {}
        for name in ("sequence", "sequence_token"):
            x = logp.clone().requires_grad_(True)
            obj = PolicyObjective(ratio=RATIOS[name](), clip=CLIPS[clip](), aggregation=agg)
            loss, _ = obj(x, old, a, mask)
            out[name] = (loss.detach(), grad_of(loss, x))
        torch.testing.assert_close(out["sequence_token"][0], out["sequence"][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["sequence_token"][1], out["sequence"][1], rtol=1e-10, atol=1e-12)


# --- gradients at ratio 1 and of the weight clip --------------------------------------------------

def agg_weight(agg, mask, max_len=None):
    """Per-token weight c_t of each aggregation (loss = sum c_t l_t), written out."""
    n, t = mask.shape
    lens = mask.sum(-1, keepdim=True)
    return {"token_mean": mask / mask.sum(),
            "seq_mean_token_mean": mask / lens.clamp(min=1) / n,
            "seq_mean_token_sum": mask / n,
            "seq_mean_token_sum_norm": mask / (n * (max_len or t))}[agg]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio", ["token", "sequence_token"])
@pytest.mark.parametrize("clip", [PPOClip(0.2), PPOClip(0.1, 0.3, dual_clip=3.0, delta=2.0), NoClip(),
                                  WeightClip(0.2, 0.2)])
def test_gradient_at_ratio_one_is_plain_policy_gradient(agg, ratio, clip):
    # logp == old_logp but logp requires grad: ratio 1, the clip is inactive and
    # d loss / d logp_t = -A_t * c_t (c_t = 1/normaliser weight of token t)
    logp, _, mask = batch(3)
    old = logp.clone()
    x = logp.clone().requires_grad_(True)
    adv = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(9)) * mask
    loss, metrics = PolicyObjective(ratio=ratio, clip=clip, aggregation=agg)(x, old, adv, mask)
    torch.testing.assert_close(grad_of(loss, x), -adv * agg_weight(agg, mask), rtol=1e-12, atol=1e-15)
    for k in ("token_low", "token_high", "token_region", "token_cap", "seq_low", "seq_high", "seq_region"):
        assert metrics[f"clip/{k}"].item() == 0.0  # nothing is clipped at ratio 1
    assert metrics["ratio/min"].item() == metrics["ratio/max"].item() == 1.0


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (None, 0.28), (0.1, None)])
def test_weight_clip_gradient_is_stopgrad_clipped_weight_times_advantage(eps_low, eps_high):
    logp, old, mask = batch(4, spread=0.5)
    adv = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(1)) * mask
    x = logp.clone().requires_grad_(True)
    ratio, lr = TokenRatio()(x, old, mask)
    loss_tok, flags = WeightClip(eps_low, eps_high)(ratio, adv, lr)
    lo = -math.inf if eps_low is None else 1 - eps_low
    hi = math.inf if eps_high is None else 1 + eps_high
    w = (logp - old).exp() * mask + (1 - mask)
    # d/dlogp of sum_t -sg(clip(w_t)) A_t (logp_t - old_t) = -clip(w_t) A_t
    torch.testing.assert_close(grad_of(loss_tok.sum(), x), -w.clamp(lo, hi) * adv)
    assert flags["outside"].any()  # some weights are truncated ...
    assert not flags["region"].any()  # ... but the weight clip never zeroes a gradient


# --- PPO clip: hand-derived cases ----------------------------------------------------------------

def ppo_case(clip, ratios, advs):
    lr = torch.tensor([ratios], dtype=F64).log().requires_grad_(True)
    mask = torch.ones_like(lr)
    r, lrr = TokenRatio()(lr, torch.zeros_like(lr), mask)
    adv = torch.tensor([advs], dtype=F64)
    loss, flags = clip(r, adv, lrr)
    return loss.detach()[0].tolist(), (-grad_of(loss.sum(), lr))[0].tolist(), {k: v[0].tolist() for k, v in flags.items()}


def test_ppo_asymmetric_hand_computed():
    clip = PPOClip(eps_low=0.2, eps_high=0.28)  # range [0.8, 1.28]
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
    advs = [1.0, -1.0, -1.0, 1.0, 2.0]
    loss, coef, flags = ppo_case(clip, ratios, advs)
    # 1.5, A=+1: -min(1.5, 1.28) = -1.28 (clipped, zero grad)
    # 1.5, A=-1: -min(-1.5, -1.28) = 1.5 (unclipped, coef w*A = -1.5)
    # 0.5, A=-1: -min(-0.5, -0.8) = 0.8 (clipped, zero grad)
    # 0.5, A=+1: -min(0.5, 0.8) = -0.5 (unclipped, coef 0.5)
    # 1.1, A=+2: -2.2 (inside, coef 2.2)
    assert loss == pytest.approx([-1.28, 1.5, 0.8, -0.5, -2.2])
    assert coef == pytest.approx([0.0, -1.5, 0.0, 0.5, 2.2])
    assert flags["high"] == [True, False, False, False, False]
    assert flags["low"] == [False, False, True, False, False]
    assert flags["region"] == [True, False, True, False, False]
    assert flags["outside"] == [True, True, True, True, False]


def test_ppo_dual_clip_hand_computed():
    clip = PPOClip(0.2, dual_clip=3.0)
    loss, coef, flags = ppo_case(clip, [5.0, 2.0, 5.0], [-2.0, -2.0, 2.0])
    # 5.0, A=-2: PPO loss 2*5 = 10, capped at -c*A = 6 (zero grad, cap flag)
    # 2.0, A=-2: 4 < 6, unchanged, coef w*A = -4
    # 5.0, A=+2: high clip -2*1.2 = -2.4, the dual clip only acts for A < 0
    assert loss == pytest.approx([6.0, 4.0, -2.4])
    assert coef == pytest.approx([0.0, -4.0, 0.0])
    assert flags["cap"] == [True, False, False]
    assert flags["high"] == [False, False, True]


def test_ppo_delta_hand_computed():
    clip = PPOClip(0.2, delta=1.5)
    loss, coef, flags = ppo_case(clip, [2.0, 1.4, 2.0], [-1.0, -1.0, 1.0])
    # 2.0, A=-1: w capped at delta: -min(-1.5, -1.2) = 1.5 (zero grad, cap flag)
    # 1.4, A=-1: below delta: -min(-1.4, -1.2) = 1.4, coef -1.4
    # 2.0, A=+1: -min(1.5, 1.2) = -1.2 (high clip)
    assert loss == pytest.approx([1.5, 1.4, -1.2])
    assert coef == pytest.approx([0.0, -1.4, 0.0])
    assert flags["cap"] == [True, False, False]


def test_weight_clip_without_lower_bound_is_cispo():
    loss, coef, flags = ppo_case(WeightClip(None, 0.28), [0.1, 2.0, 1.0], [1.0, 1.0, -1.0])
    # coef = sg(clip(w)) * A: 0.1 (no lower bound), min(2, 1.28) = 1.28, 1 * -1
    assert coef == pytest.approx([0.1, 1.28, -1.0])
    # value -clip(w) A log w: -0.1*log 0.1, -1.28*log 2, 0
    assert loss == pytest.approx([-0.1 * math.log(0.1), -1.28 * math.log(2.0), 0.0])
    assert flags["outside"] == [False, True, False]


def test_no_clip_is_importance_weighted_reinforce():
    loss, coef, _ = ppo_case(NoClip(), [3.0, 0.5], [1.0, -2.0])
    assert loss == pytest.approx([-3.0, 1.0])  # -w A
    assert coef == pytest.approx([3.0, -1.0])  # d(w A)/dlogp = w A


# --- extremes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", list(RATIOS))
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_log_ratios_stay_finite(ratio, clip, dtype):
    logp, _, mask = batch(5, n=4, t=5)
    old = logp + torch.tensor([1000.0, -1000.0, 1000.0, -1000.0], dtype=F64)[:, None]
    old[0, 1] = logp[0, 1] - 1000  # mixed signs inside one row
    x = logp.to(dtype).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=dtype)[:, None] * mask.to(dtype)
    for agg in AGGS:
        obj = PolicyObjective(ratio=ratio, clip=CLIPS[clip](), aggregation=agg, kl="k3", kl_coef=0.1)
        loss, metrics = obj(x, old.to(dtype), adv, mask.to(dtype), ref_logp=old.to(dtype))
        assert torch.isfinite(loss)
        assert torch.isfinite(grad_of(loss, x)).all()
        assert all(torch.isfinite(v) for v in metrics.values())
