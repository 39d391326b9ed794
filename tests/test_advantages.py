"""Advantage estimators: identities, edge cases and hand-derived values."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from rlopt.algorithms import DiscountedReturn, GroupBaseline, GroupContrast

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None)

reward = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def groups(min_g=2, max_g=6, max_b=3):
    """(rewards [B*G] list, G)."""
    return st.integers(min_g, max_g).flatmap(
        lambda g: st.tuples(st.lists(reward, min_size=g, max_size=g * max_b).map(
            lambda xs, g=g: xs[: len(xs) // g * g]), st.just(g)))


ALL_GROUP_ESTIMATORS = [
    GroupBaseline(scale=scale, std=std, eps=eps, leave_one_out=loo)
    for scale in ("group", "batch", "none") for std in ("unbiased", "population")
    for eps in (0.0, 1e-6) for loo in (False, True)
] + [GroupContrast(), GroupContrast(atol=0.0)]


@SETTINGS
@given(groups())
def test_leave_one_out_is_g_over_g_minus_1_times_mean_centring(data):
    rewards, g = data
    r = torch.tensor(rewards, dtype=F64)
    mask = torch.ones(len(rewards), 3, dtype=F64)
    centred = GroupBaseline(scale="none")(r, mask, group_size=g)
    loo = GroupBaseline(scale="none", leave_one_out=True)(r, mask, group_size=g)
    torch.testing.assert_close(loo, centred * g / (g - 1), rtol=1e-9, atol=1e-9)
    # and the definition R_i - mean_{j != i} R_j, by loops
    for b in range(len(rewards) // g):
        grp = rewards[b * g:(b + 1) * g]
        for k, rk in enumerate(grp):
            others = [x for j, x in enumerate(grp) if j != k]
            assert loo[b * g + k, 0].item() == pytest.approx(rk - sum(others) / (g - 1), rel=1e-9, abs=1e-9)


@SETTINGS
@given(value=reward, g=st.integers(2, 6), n_groups=st.integers(1, 3), seed=st.integers(0, 10))
def test_equal_rewards_give_zero_advantage_and_no_nan(value, g, n_groups, seed):
    torch.manual_seed(seed)
    # the first group is all `value`; the others random (so batch std is nonzero sometimes)
    r = torch.cat([torch.full((g,), value, dtype=F64), torch.randn((n_groups - 1) * g, dtype=F64)])
    mask = torch.ones(n_groups * g, 4, dtype=F64)
    for est in ALL_GROUP_ESTIMATORS:
        adv = est(r, mask, group_size=g)
        assert torch.isfinite(adv).all(), est
        assert (adv[:g] == 0).all(), est
        for dtype in (torch.float32,):
            adv32 = est(r.to(dtype), mask, group_size=g)
            assert torch.isfinite(adv32).all() and (adv32[:g] == 0).all(), est


def test_equal_rewards_regression_three_tenths():
    # 0.1 + 0.1 + 0.1 != 0.3 in floating point, so the group mean differs from 0.1 by 1 ulp;
    # the advantage must still be exactly 0 (and not 0/0 = NaN with eps=0)
    r = torch.tensor([0.1, 0.1, 0.1], dtype=F64)
    mask = torch.ones(3, 2, dtype=F64)
    for est in ALL_GROUP_ESTIMATORS:
        assert (est(r, mask, group_size=3) == 0).all(), est


@SETTINGS
@given(groups())
def test_group_baseline_matches_loop_definition(data):
    rewards, g = data
    r = torch.tensor(rewards, dtype=F64)
    mask = torch.ones(len(rewards), 2, dtype=F64)
    adv = GroupBaseline(scale="group", std="unbiased", eps=1e-6)(r, mask, group_size=g)
    for b in range(len(rewards) // g):
        grp = rewards[b * g:(b + 1) * g]
        mu = sum(grp) / g
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (g - 1))
        for k, x in enumerate(grp):
            exp = 0.0 if max(grp) == min(grp) else (x - mu) / (sd + 1e-6)
            assert adv[b * g + k, 0].item() == pytest.approx(exp, rel=1e-7, abs=1e-7)


def test_group_baseline_batch_scale_hand_computed():
    # two groups of 2: [1, 3], [0, 4]; group means 2, 2 -> centred [-1, 1, -2, 2]
    # batch std (unbiased) of [1, 3, 0, 4]: mean 2, squares 1+1+4+4 = 10, /3 -> sqrt(10/3)
    r = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=F64)
    mask = torch.ones(4, 1, dtype=F64)
    adv = GroupBaseline(scale="batch", eps=0.0)(r, mask, group_size=2)[:, 0]
    sd = math.sqrt(10 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1, 1, -2, 2], dtype=F64) / sd)
    # reduce_sum is applied to the batch statistics (here: a fake 2-rank sum of identical ranks
    # doubles n, sum, sum of squares -> n 8, mean 16/8 = 2, var (2*26 - 8*2^2)/7 = 20/7)
    adv2 = GroupBaseline(scale="batch", eps=0.0)(r, mask, group_size=2, reduce_sum=lambda t: 2 * t)[:, 0]
    torch.testing.assert_close(adv2, torch.tensor([-1, 1, -2, 2], dtype=F64) / math.sqrt(20 / 7))


def test_advantages_are_masked_and_constant_over_tokens():
    r = torch.tensor([9.0, 8.0, 5.0, 1.0], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=F64)
    for est in ALL_GROUP_ESTIMATORS:
        adv = est(r, mask, group_size=2)
        assert (adv[mask == 0] == 0).all()
        # the value on the tokens of each row is the same
        for i in range(4):
            vals = adv[i][mask[i] == 1]
            assert (vals == vals[0]).all() if len(vals) else True


def test_invalid_rewards_get_zero_and_are_left_out_of_group_stats():
    # group [9, NaN(invalid), 5]: stats over {9, 5}: mean 7 -> contrast +1, 0, -1;
    # baseline unbiased: std sqrt(8) -> (9-7)/sqrt(8), 0, (5-7)/sqrt(8)
    r = torch.tensor([9.0, float("nan"), 5.0], dtype=F64)
    valid = torch.tensor([True, False, True])
    mask = torch.ones(3, 1, dtype=F64)
    adv = GroupBaseline(eps=0.0)(r, mask, group_size=3, valid=valid)[:, 0]
    torch.testing.assert_close(adv, torch.tensor([2, 0, -2], dtype=F64) / math.sqrt(8))
    adv = GroupContrast()(r, mask, group_size=3, valid=valid)[:, 0]
    torch.testing.assert_close(adv, torch.tensor([1.0, 0.0, -1.0], dtype=F64))


def test_group_contrast_at_the_mean_is_zero():
    # [3, 2, 1]: mean 2: good {3} -> 1, at-mean {2} -> 0, bad {1} -> -1
    adv = GroupContrast()(torch.tensor([3.0, 2.0, 1.0], dtype=F64), torch.ones(3, 1), group_size=3)
    assert adv[:, 0].tolist() == [1.0, 0.0, -1.0]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 6), reward), min_size=1, max_size=4),
       st.floats(0.01, 1.0))
def test_discounted_return_terminal_reward_is_gamma_power(rows, gamma):
    t = 6
    mask = torch.zeros(len(rows), t, dtype=F64)
    for i, (n, _) in enumerate(rows):
        mask[i, :n] = 1
    r = torch.tensor([x for _, x in rows], dtype=F64)
    ret = DiscountedReturn(gamma=gamma)(r, mask)
    for i, (n, x) in enumerate(rows):
        for k in range(t):
            # G_t = gamma^(L-t) R for the L real tokens (1-based t), 0 on padding
            exp = x * gamma ** (n - 1 - k) if k < n else 0.0
            assert ret[i, k].item() == pytest.approx(exp, rel=1e-9, abs=1e-12)


def test_discounted_return_per_token_rewards_by_loops():
    # per-token rewards [1, 0, 2] with gamma 0.5: G_3 = 2, G_2 = 0 + 0.5*2 = 1, G_1 = 1 + 0.5*1 = 1.5
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0]], dtype=F64)  # the 5.0 is on a padding token
    mask = torch.tensor([[1, 1, 1, 0]], dtype=F64)
    ret = DiscountedReturn(gamma=0.5)(r, mask)
    assert ret[0].tolist() == [1.5, 1.0, 2.0, 0.0]


def test_discounted_return_whiten():
    # returns with gamma 1 of terminal rewards [1] and [3] on one token each: [1, 3];
    # whitened over tokens: mean 2, unbiased std sqrt(2) -> [-1/sqrt2, 1/sqrt2]
    ret = DiscountedReturn(gamma=1.0, whiten=True, eps=0.0)(
        torch.tensor([1.0, 3.0], dtype=F64), torch.ones(2, 1, dtype=F64))
    torch.testing.assert_close(ret[:, 0], torch.tensor([-1.0, 1.0], dtype=F64) / math.sqrt(2))


def test_float64_is_kept():
    r = torch.tensor([1.0, 2.0], dtype=F64)
    mask = torch.ones(2, 2)
    for est in (GroupBaseline(), GroupContrast(), DiscountedReturn()):
        assert est(r, mask, group_size=2).dtype == F64
    assert GroupBaseline()(r.float(), mask, group_size=2).dtype == torch.float32
