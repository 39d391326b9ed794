"""Loss aggregation and the composed objective: formulas, masking, empty rows, KL/entropy terms."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from rlopt.algorithms import (
    NoClip, PolicyObjective, PPOClip, ProductRatio, SeqMeanTokenMean, SeqMeanTokenSum,
    SeqMeanTokenSumNorm, SequenceRatio, SequenceTokenRatio, TokenMean, TokenRatio, WeightClip,
    clip_metrics, kl_k1, kl_k2, kl_k3,
)

F64 = torch.float64
RATIOS = [TokenRatio, SequenceRatio, SequenceTokenRatio, ProductRatio]
CLIPS = [lambda: PPOClip(0.2), lambda: PPOClip(0.1, 0.15, dual_clip=2.0, delta=1.5),
         lambda: WeightClip(0.2, 0.28), lambda: WeightClip(None, 0.28), NoClip]
AGGS = [TokenMean, SeqMeanTokenMean, SeqMeanTokenSum, lambda: SeqMeanTokenSumNorm(max_len=9),
        SeqMeanTokenSumNorm]
COMBOS = list(itertools.product(range(len(RATIOS)), range(len(CLIPS)), range(len(AGGS))))


def batch(seed, n=4, t=6, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]).to(F64)
    old = -torch.rand(n, t, generator=g, dtype=F64) * 3 - 0.1
    logp = old + spread * torch.randn(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, t, generator=g, dtype=F64) * mask
    ref = old + 0.2 * torch.randn(n, t, generator=g, dtype=F64)
    ent = torch.rand(n, t, generator=g, dtype=F64) * 2
    return logp, old, adv, mask, ref, ent


def run(ratio, clip, agg, logp, old, adv, mask, ref=None, ent=None, **kw):
    x = logp.clone().requires_grad_(True)
    obj = PolicyObjective(ratio=RATIOS[ratio](), clip=CLIPS[clip](), aggregation=AGGS[agg](), **kw)
    loss, metrics = obj(x, old, adv, mask, ref_logp=ref, entropy=ent)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g, metrics


# --- aggregation formulas by loops -----------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10), min_size=0, max_size=5), min_size=1, max_size=4))
def test_aggregations_match_loops(rows):
    t = 5
    vals = torch.full((len(rows), t), 1e6, dtype=F64)  # garbage in padding
    mask = torch.zeros(len(rows), t, dtype=F64)
    for i, row in enumerate(rows):
        vals[i, :len(row)] = torch.tensor(row, dtype=F64)
        mask[i, :len(row)] = 1
    n, ntok = len(rows), sum(len(r) for r in rows)
    seq_sums = [sum(r) for r in rows]
    expected = {
        "tm": sum(seq_sums) / max(ntok, 1),  # sum over all tokens / number of tokens
        "smtm": sum(s / max(len(r), 1) for s, r in zip(seq_sums, rows)) / n,  # mean of row means
        "smts": sum(seq_sums) / n,  # mean of row sums
        "norm9": sum(seq_sums) / (n * 9),  # mean of row sums / max_len
        "normT": sum(seq_sums) / (n * t),  # max_len None: padded width T
    }
    for key, agg in zip(expected, AGGS):
        assert agg()(vals, mask).item() == pytest.approx(expected[key], rel=1e-12, abs=1e-12)


def test_aggregation_counts():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64)
    assert TokenMean().count(mask).item() == 3  # tokens
    assert SeqMeanTokenMean().count(mask).item() == 2  # rows
    assert SeqMeanTokenSum().count(mask).item() == 2  # rows
    assert SeqMeanTokenSumNorm(max_len=10).count(mask).item() == 20  # rows * max_len
    assert SeqMeanTokenSumNorm().count(mask).item() == 6  # rows * T


# --- masking ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,clip,agg", COMBOS)
def test_masked_tokens_never_change_loss_or_gradient(ratio, clip, agg):
    logp, old, adv, mask, ref, ent = batch(ratio * 100 + clip * 10 + agg)
    base_loss, base_grad, base_m = run(ratio, clip, agg, logp, old, adv, mask, ref, ent,
                                       kl="k3", kl_coef=0.05, entropy_coef=0.01)
    pad = mask == 0
    assert pad.any()
    garbage = torch.tensor([1e30, -1e30, 5e3, -7.0, 1e4, float("inf"), -float("inf"), float("nan")], dtype=F64)
    for k, gv in enumerate(garbage):
        g2 = garbage.roll(k)
        logp2, old2, adv2, ref2, ent2 = (x.clone() for x in (logp, old, adv, ref, ent))
        logp2[pad], old2[pad], adv2[pad], ref2[pad], ent2[pad] = gv, -g2[0], g2[1], g2[2], g2[3]
        loss, grad, m = run(ratio, clip, agg, logp2, old2, adv2, mask, ref2, ent2,
                            kl="k3", kl_coef=0.05, entropy_coef=0.01)
        torch.testing.assert_close(loss, base_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, base_grad, rtol=1e-12, atol=1e-14)
        assert (grad[pad] == 0).all()
        for key, v in base_m.items():
            torch.testing.assert_close(m[key], v, rtol=1e-12, atol=1e-14, msg=key)


# --- empty completions -------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,clip,agg", COMBOS)
def test_empty_completion_gives_finite_loss_and_gradients(ratio, clip, agg):
    logp, old, adv, mask, ref, ent = batch(7)
    mask[1] = 0  # a completion with zero tokens
    adv = adv * mask
    loss, grad, metrics = run(ratio, clip, agg, logp, old, adv, mask, ref, ent, kl="k2", kl_coef=0.1)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[1] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    # an all-empty batch: loss 0, zero gradient, finite metrics
    z = torch.zeros_like(mask)
    loss, grad, metrics = run(ratio, clip, agg, logp, old, adv * 0, z, ref, ent, kl="k2", kl_coef=0.1)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_empty_row_is_left_out_of_per_sequence_clip_fraction():
    # row 0: 2 tokens, 1 high-clipped -> 1/2; row 1: empty (left out); row 2: 1 token, 0
    flags = {k: torch.zeros(3, 2, dtype=torch.bool) for k in ("low", "high", "region", "cap", "outside")}
    flags["high"][0, 0] = flags["region"][0, 0] = True
    flags["high"][1, 0] = True  # on an empty row: masked out
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=F64)
    m = clip_metrics(flags, mask)
    assert m["clip/token_high"].item() == pytest.approx(1 / 3)  # 1 of 3 tokens
    assert m["clip/seq_high"].item() == pytest.approx(0.25)  # mean(1/2, 0) over 2 non-empty rows


# --- composition: KL and entropy ----------------------------------------------------------------

@pytest.mark.parametrize("kl,fn", [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)])
def test_kl_and_entropy_terms(kl, fn):
    logp, old, adv, mask, ref, ent = batch(11)
    beta, alpha = 0.04, 0.003
    total, _, m = run(0, 0, 1, logp, old, adv, mask, ref, ent, kl=kl, kl_coef=beta, entropy_coef=alpha)
    policy, _, _ = run(0, 0, 1, logp, old, adv, mask)
    # per-token KL by definition, x = ref - logp
    x = ref - logp
    kl_tok = {"k1": -x, "k2": 0.5 * x ** 2, "k3": x.exp() - x - 1}[kl]
    torch.testing.assert_close(fn(logp, ref), kl_tok)
    agg = SeqMeanTokenMean()
    expected = policy + beta * agg(kl_tok, mask) - alpha * agg(ent, mask)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m["kl/mean"], (kl_tok * mask).sum() / mask.sum())
    torch.testing.assert_close(m["entropy/mean"], (ent * mask).sum() / mask.sum())
    assert m["loss/total"].item() == pytest.approx(total.item())


def test_kl_k3_is_nonnegative_and_zero_at_reference():
    logp, _, _, _, ref, _ = batch(12)
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k3(ref, ref) == 0).all()


def test_metric_values_hand_computed():
    # ratios [2, 0.5 | 1, pad], advantages [1, -1 | 3, pad]
    logp = torch.tensor([[math.log(2), math.log(0.5)], [0.0, 9.0]], dtype=F64)
    old = torch.zeros(2, 2, dtype=F64)
    adv = torch.tensor([[1.0, -1.0], [3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=F64)
    _, m = PolicyObjective("token", PPOClip(0.2), "token_mean")(logp, old, adv, mask)
    assert m["ratio/mean"].item() == pytest.approx((2 + 0.5 + 1) / 3)
    assert m["ratio/min"].item() == pytest.approx(0.5) and m["ratio/max"].item() == pytest.approx(2.0)
    assert m["advantage/mean"].item() == pytest.approx(1.0)  # (1 - 1 + 3)/3
    # population std of [1, -1, 3]: mean 1, E[A^2] = 11/3 -> sqrt(11/3 - 1) = sqrt(8/3)
    assert m["advantage/std"].item() == pytest.approx(math.sqrt(8 / 3))
    # token 1: w=2 > 1.2, A>0 -> high; token 2: w=0.5 < 0.8, A<0 -> low
    assert m["clip/token_high"].item() == pytest.approx(1 / 3)
    assert m["clip/token_low"].item() == pytest.approx(1 / 3)
    assert m["clip/token_region"].item() == pytest.approx(2 / 3)
    # per sequence: row 0 region 2/2, row 1 0/1 -> mean 0.5
    assert m["clip/seq_region"].item() == pytest.approx(0.5)
