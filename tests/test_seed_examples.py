"""The seed document's worked examples, reproduced through the library.

Source: the seed 000_f848886115f8dc72.txt (GRPO steps 1-3, GSPO steps 1-4). Expected values
are copied from the project's reference vectors (recomputed exactly; the seed itself rounds to
2-3 decimals). Where the seed's own arithmetic is wrong (token 4 of the GRPO example) the
correct value is asserted and the seed's value is asserted to be *different*.
Everything runs in float64; tolerance 1e-6 relative.
"""

import math

import pytest
import torch

from rlopt.algorithms import (
    DiscountedReturn, GroupBaseline, GroupContrast, NoClip, PolicyObjective, PPOClip,
    SequenceRatio, TokenRatio, WeightClip, build_preset,
)

F64 = torch.float64
REL = 1e-6


def close(actual, expected, rel=REL):
    a = torch.as_tensor(actual, dtype=F64).detach()
    e = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(a, e, rtol=rel, atol=0.0)


# --- GRPO example (seed 000_f848886115f8dc72.txt, "GRPO 具体计算方式") -----------------------
TERMINAL_REWARD, GAMMA, LENGTH = 8.0, 0.9, 5
# G_t = gamma^(L-t) * 8: 0.9^4*8, 0.9^3*8, 0.9^2*8, 0.9*8, 8
RETURNS = [5.2488, 5.832000000000001, 6.48, 7.2, 8.0]
PI_OLD = [0.3, 0.2, 0.15, 0.8, 0.4]
PI_NEW = [0.4, 0.25, 0.18, 0.7, 0.6]
# w_t = pi_new / pi_old: 0.4/0.3, 0.25/0.2, 0.18/0.15, 0.7/0.8, 0.6/0.4
RATIOS = [1.3333333333333335, 1.25, 1.2, 0.8749999999999999, 1.4999999999999998]
# clip(w, 0.8, 1.2): 1.2, 1.2, 1.2 (boundary), 0.875 (inside!), 1.2
CLIPPED = [1.2, 1.2, 1.2, 0.8749999999999999, 1.2]
# clip(w_t) * G_t: 1.2*5.2488, 1.2*5.832, 1.2*6.48, 0.875*7.2 = 6.3, 1.2*8
GRAD_COEF = [6.29856, 6.998400000000001, 7.776, 6.299999999999999, 9.6]
SEED_PRINTED_TOKEN4 = 5.76  # the seed's erratum: "0.875 < 0.8, clipped to 0.8", 0.8*7.2


def grpo_inputs():
    logp = torch.tensor(PI_NEW, dtype=F64).log()[None].requires_grad_(True)  # [1, 5]
    old = torch.tensor(PI_OLD, dtype=F64).log()[None]  # [1, 5]
    mask = torch.ones(1, LENGTH, dtype=F64)
    return logp, old, mask


def test_grpo_step1_discounted_return():
    mask = torch.ones(1, LENGTH, dtype=F64)
    returns = DiscountedReturn(gamma=GAMMA)(torch.tensor([TERMINAL_REWARD], dtype=F64), mask)
    close(returns[0], RETURNS)
    # the seed prints 5.25 and 5.83 for tokens 1, 2 (rounded)
    assert round(returns[0, 0].item(), 2) == 5.25 and round(returns[0, 1].item(), 2) == 5.83


def test_grpo_step1_terminal_reward_goes_to_last_unmasked_token():
    # same example right-padded to T=7: padding gets 0, the 5 real tokens the same returns
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=F64)
    returns = DiscountedReturn(gamma=GAMMA)(torch.tensor([TERMINAL_REWARD], dtype=F64), mask)
    close(returns[0], RETURNS + [0.0, 0.0])


def test_grpo_step2_token_ratio():
    logp, old, mask = grpo_inputs()
    ratio, log_ratio = TokenRatio()(logp, old, mask)
    close(ratio[0], RATIOS)
    close(log_ratio[0], [math.log(n / o) for n, o in zip(PI_NEW, PI_OLD)])


def test_grpo_step3_weight_clip_weights_and_gradient_coefficients():
    logp, old, mask = grpo_inputs()
    adv = torch.tensor([RETURNS], dtype=F64)
    ratio, log_ratio = TokenRatio()(logp, old, mask)
    loss_tok, flags = WeightClip(eps_low=0.2, eps_high=0.2)(ratio, adv, log_ratio)
    # the clipped weight is the coefficient divided by the return
    (grad,) = torch.autograd.grad(loss_tok.sum(), logp)
    coef = -grad[0]  # = -d loss_t / d logp_t = sg(clip(w_t)) * G_t
    close(coef, GRAD_COEF)
    close(coef / adv[0], CLIPPED)
    # tokens 1, 2, 5 are truncated (w > 1.2), token 4 is not; token 3 sits on the boundary
    assert flags["outside"][0].tolist() == [True, True, flags["outside"][0, 2].item(), False, True]


def test_grpo_token4_erratum_is_6_3_not_5_76():
    # ERRATUM in seed 000_f848886115f8dc72.txt: it says w_4 = 0.875 "is clipped to 0.8 because
    # 0.875 < 0.8" and prints 0.8 * 7.2 = 5.76. But 0.875 lies inside [0.8, 1.2], so it is not
    # clipped: the coefficient is 0.875 * 7.2 = 6.3.
    logp, old, mask = grpo_inputs()
    adv = torch.tensor([RETURNS], dtype=F64)
    ratio, log_ratio = TokenRatio()(logp, old, mask)
    loss_tok, _ = WeightClip(0.2, 0.2)(ratio, adv, log_ratio)
    (grad,) = torch.autograd.grad(loss_tok.sum(), logp)
    token4 = -grad[0, 3].item()
    assert token4 == pytest.approx(6.3, rel=REL)
    assert token4 != pytest.approx(SEED_PRINTED_TOKEN4, rel=1e-2)


def test_grpo_seed_preset_end_to_end():
    # build_preset("discounted_weight_clip"): discounted return gamma 0.9 + weight clip 0.2 + token sum;
    # with one sequence the loss is sum_t -clip(w_t) G_t log w_t, so -grad = clip(w_t) * G_t
    est, obj = build_preset("discounted_weight_clip")
    logp, old, mask = grpo_inputs()
    adv = est(torch.tensor([TERMINAL_REWARD], dtype=F64), mask)
    close(adv[0], RETURNS)
    loss, _ = obj(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    close(-grad[0], GRAD_COEF)


def test_grpo_papers_ppo_objective_clip():
    # PPO objective min(w*A, clip(w)*A), A_t = G_t > 0, eps 0.2: where w > 1.2 the min picks the
    # constant clip(w)*A, so the gradient is zero (tokens 1, 2, 5); token 4 is unclipped and its
    # coefficient is d(w*A)/dlogp = w*A = 0.875 * 7.2 = 6.3.
    logp, old, mask = grpo_inputs()
    adv = torch.tensor([RETURNS], dtype=F64)
    obj = PolicyObjective(ratio="token", clip=PPOClip(0.2), aggregation="seq_mean_token_sum")
    loss, metrics = obj(logp, old, adv, mask)  # N = 1: the loss is the plain token sum
    ratio, log_ratio = TokenRatio()(logp, old, mask)
    _, flags = PPOClip(0.2)(ratio, adv, log_ratio)
    high = flags["high"][0].tolist()
    # token 3 (w = 1.2 up to rounding) is on the boundary: not asserted
    assert [high[i] for i in (0, 1, 3, 4)] == [True, True, False, True]
    (grad,) = torch.autograd.grad(loss, logp)
    coef = -grad[0]
    assert coef[3].item() == pytest.approx(6.299999999999999, rel=REL)
    for i in (0, 1, 4):
        assert coef[i].item() == 0.0
    # token 3: either side of the boundary gives 0 or w*A = 1.2 * 6.48
    assert coef[2].item() in (0.0, pytest.approx(1.2 * 6.48, rel=REL))


# --- GSPO example (seed 000_f848886115f8dc72.txt, "GSPO 具体计算方式") -----------------------
LENGTHS = [7, 5, 3]
SEQ_P_OLD = [1e-9, 1e-7, 1e-5]
SEQ_P_NEW = [2e-9, 1.5e-7, 8e-6]
# s = (p_new/p_old)^(1/L): 2^(1/7), 1.5^(1/5), 0.8^(1/3)
SEQ_RATIOS = [1.1040895136738123, 1.0844717711976986, 0.9283177667225558]
REWARDS = [9.0, 8.0, 5.0]
SEQ_GRADS = [5.0, 3.0, 2.0]  # the seed's given d log pi(y|x) values


def gspo_batch():
    """[3, 7] padded batch; per-token logps are uneven splits of log P(y) over the L tokens."""
    logp = torch.zeros(3, 7, dtype=F64)
    old = torch.zeros(3, 7, dtype=F64)
    mask = torch.zeros(3, 7, dtype=F64)
    for i, n in enumerate(LENGTHS):
        w = torch.arange(1, n + 1, dtype=F64)
        w = w / w.sum()  # uneven shares that sum to 1
        logp[i, :n] = math.log(SEQ_P_NEW[i]) * w
        old[i, :n] = math.log(SEQ_P_OLD[i]) * w.flip(0)
        mask[i, :n] = 1.0
        logp[i, n:] = 123.0  # garbage in padding
        old[i, n:] = -77.0
    return logp, old, mask


def test_gspo_step2_sequence_ratio():
    logp, old, mask = gspo_batch()
    # the per-token logps sum to log P(y)
    close((logp * mask).sum(-1), [math.log(p) for p in SEQ_P_NEW])
    ratio, _ = SequenceRatio()(logp, old, mask)
    for i, n in enumerate(LENGTHS):
        close(ratio[i, :n], [SEQ_RATIOS[i]] * n)  # broadcast to every real token
        close(ratio[i, n:], [1.0] * (7 - n))  # padding: ratio 1
    assert [round(ratio[i, 0].item(), 3) for i in range(3)] == [1.104, 1.084, 0.928]  # seed's rounding


def test_gspo_step1_and_3_group_contrast():
    mask = torch.ones(3, 1, dtype=F64)
    adv = GroupContrast()(torch.tensor(REWARDS, dtype=F64), mask, group_size=3)[:, 0]
    # mean 22/3 = 7.33: good = {9, 8} -> +1/2 each, bad = {5} -> -1/1
    close(adv, [0.5, 0.5, -1.0])
    s = torch.tensor(SEQ_RATIOS, dtype=F64)
    # group ratio gap = (1.10409 + 1.08447)/2 - 0.92832 = sum_i A_i s_i
    gap = (adv * s).sum()
    close(gap, 0.16596287571319956)
    assert round(gap.item(), 3) == 0.166  # the seed prints 0.166


def test_gspo_step4_gradient_as_sum_of_a_s_g():
    mask = torch.ones(3, 1, dtype=F64)
    adv = GroupContrast()(torch.tensor(REWARDS, dtype=F64), mask, group_size=3)[:, 0]
    logp, old, pmask = gspo_batch()
    s = SequenceRatio()(logp, old, pmask)[0][:, 0]  # the library's sequence ratios
    g = torch.tensor(SEQ_GRADS, dtype=F64)
    # sum_i A_i s_i g_i = 0.5*1.10409*5 + 0.5*1.08447*3 - 0.92832*2
    close((adv * s * g).sum(), 2.530295907535966)


def test_gspo_step4_gradient_through_contrast_seq_ratio_objective():
    # Parametrise logp_{i,t}(theta) = c_{i,t} + theta * g_i so that d mean_t logp_i / d theta = g_i,
    # i.e. d s_i / d theta = s_i * g_i (the seed uses the given g_i as the gradient of the
    # length-normalised log-ratio). contrast_seq_ratio: contrast advantages, sequence ratio, no clip,
    # per-sequence token mean; with normalizer=1 the loss is -sum_i A_i s_i, so
    # -d loss / d theta = sum_i A_i s_i g_i = 2.5303.
    est, obj = build_preset("contrast_seq_ratio")
    assert isinstance(obj.clip, NoClip) and isinstance(obj.ratio, SequenceRatio)
    base, old, mask = gspo_batch()
    theta = torch.zeros((), dtype=F64, requires_grad=True)
    logp = base + theta * torch.tensor(SEQ_GRADS, dtype=F64)[:, None] * mask
    adv = est(torch.tensor(REWARDS, dtype=F64), mask, group_size=3)
    loss, _ = obj(logp, old, adv, mask, normalizer=1.0)
    close(-loss, 0.16596287571319956)  # -loss = sum_i A_i s_i, the group ratio gap
    (grad,) = torch.autograd.grad(loss, theta)
    close(-grad, 2.530295907535966)
    assert round(-grad.item(), 2) == 2.53  # the seed prints 2.53


def test_gspo_papers_group_baseline_advantages():
    mask = torch.ones(3, 2, dtype=F64)
    r = torch.tensor(REWARDS, dtype=F64)
    # mean 22/3; deviations 5/3, 2/3, -7/3; sum of squares 26/3;
    # unbiased std sqrt(13/3) = 2.0817, population std sqrt(26/9) = 1.6997
    unbiased = GroupBaseline(scale="group", std="unbiased", eps=0.0)(r, mask, group_size=3)
    close(unbiased[:, 0], [0.8006407690254359, 0.32025630761017443, -1.12089707663561])
    close(unbiased[:, 1], unbiased[:, 0])  # same value on every token
    population = GroupBaseline(scale="group", std="population", eps=0.0)(r, mask, group_size=3)
    close(population[:, 0], [0.9805806756909203, 0.39223227027636826, -1.372812945967288])
    # the default eps=1e-6 moves them by at most 1e-6/std (relative) < 1e-6
    default = GroupBaseline()(r, mask, group_size=3)
    close(default[:, 0], unbiased[:, 0])
