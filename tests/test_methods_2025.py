"""The 2025-26 components (issue 14) against naive float64 references written from the papers.

Every reference below walks sequences and tokens with Python loops; stop-gradients are
``.detach()`` on 0-dim float64 tensors, so torch.autograd gives the reference gradient wrt every
``logp[i, t]``. The library is called through ``PolicyObjective`` (token ratio, token mean unless
said otherwise), which also exercises how it hands ``logp``/``old_logp``/``mask`` to the
strategies with ``needs_logp``. Batches have padding (holding NaN/inf) and an empty row.
"""

from __future__ import annotations

import math
import os
import re
import threading

import pytest
import torch

from rlopt.algorithms import (
    GDPO, GPG, OPO, AdaptiveEntropyCoef, DPPOKLClip, DPPOTVClip, GMPOClip, GroupBaseline, Kimi15Loss,
    LUSPOAggregation, MaxRL, NoClip, PassK, PolicyGradient, PolicyObjective, PPOClip, PromptMean, ReinforcePP,
    ReinforcePPBaseline, RewardNorm, SAPOClip, SeqMeanTokenMean, SeqMeanTokenSum, SequenceRatio, TokenMean,
    TokenRatio, TokenSum, TOPRClip, VESPOClip, WeightAbsClip, build_preset, mix_reference_, preset_names,
    preset_spec,
)

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- data ---------------------------------------------------------------------------------------

def rollout(seed: int, n: int = 6, t: int = 5, spread: float = 0.5, row_constant_adv: bool = False):
    """logp, old_logp, adv, mask (float64); row 2 is empty; padding holds NaN / inf."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, t + 1, (n,), generator=gen)
    lens[2] = 0
    lens[0] = t
    mask = (torch.arange(t)[None] < lens[:, None]).to(F64)  # [N, T]
    old = -(torch.rand(n, t, generator=gen, dtype=F64) * 2.0 + 0.05)  # log-probs in (-2.05, -0.05)
    logp = (old + spread * torch.randn(n, t, generator=gen, dtype=F64)).clamp(max=-1e-3)  # p < 1
    if row_constant_adv:
        adv = torch.randn(n, 1, generator=gen, dtype=F64).expand(n, t).clone()
        adv[1] = 0.0
    else:
        adv = torch.randn(n, t, generator=gen, dtype=F64)
        adv[1, 0] = 0.0  # an exactly-zero advantage
    adv = adv * mask
    logp = torch.where(mask > 0, logp, torch.full_like(logp, float("nan")))
    old = torch.where(mask > 0, old, torch.full_like(old, -float("inf")))
    return logp, old, adv, mask


def lib(clip, logp, old, adv, mask, ratio=None, agg=None):
    """(loss, grad wrt logp, metrics) through PolicyObjective."""
    x = logp.clone().requires_grad_(True)
    obj = PolicyObjective(ratio=ratio or TokenRatio(), clip=clip, aggregation=agg or TokenMean())
    loss, metrics = obj(x, old, adv, mask)
    loss.backward()
    return loss.detach(), x.grad, metrics


def reference(row_fn, logp, old, adv, mask, agg="token_mean"):
    """Loops: ``row_fn(lps, olds, advs) -> per-token losses`` for the valid tokens of one row
    (``lps`` are 0-dim float64 leaves), aggregated by ``agg``; returns (loss, grad [N, T])."""
    n, t_max = mask.shape
    leaves = {}
    row_sums, row_lens = [], []
    for i in range(n):
        toks = [t for t in range(t_max) if mask[i, t] > 0]
        lps = []
        for t in toks:
            leaves[i, t] = torch.tensor(float(logp[i, t]), dtype=F64, requires_grad=True)
            lps.append(leaves[i, t])
        losses = row_fn(lps, [float(old[i, t]) for t in toks], [float(adv[i, t]) for t in toks]) if toks else []
        row_sums.append(sum(losses, torch.zeros((), dtype=F64)))
        row_lens.append(len(toks))
    if agg == "token_mean":
        total = sum(row_sums) / max(sum(row_lens), 1)
    elif agg == "seq_mean_token_mean":
        total = sum(s / max(k, 1) for s, k in zip(row_sums, row_lens)) / n
    else:
        raise ValueError(agg)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    g = torch.zeros(n, t_max, dtype=F64)
    for (i, t), gr in zip(leaves, grads):
        g[i, t] = 0.0 if gr is None else gr
    return total.detach(), g


def per_token(fn):
    """A row function from a per-token loss ``fn(lp, old, a)``."""
    return lambda lps, olds, advs: [fn(lp, o, a) for lp, o, a in zip(lps, olds, advs)]


def check(clip, row_fn, seed=0, spread=0.5, agg="token_mean", lib_agg=None, ratio=None, row_constant_adv=False):
    logp, old, adv, mask = rollout(seed, spread=spread, row_constant_adv=row_constant_adv)
    loss, grad, metrics = lib(clip, logp, old, adv, mask, ratio=ratio, agg=lib_agg)
    ref_loss, ref_grad = reference(row_fn, logp, old, adv, mask, agg=agg)
    assert loss.dtype == F64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert (grad[mask == 0] == 0).all() and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0  # the reference is not vacuous
    return metrics


# --- clip axis: value and gradient against the papers' formulas ------------------------------------

def test_sapo_matches_reference():
    # SAPO (arXiv 2511.20347): L = -(4/tau) sigmoid(tau (r - 1)) A, tau = tau_pos if A > 0 else tau_neg
    def tok(lp, o, a, tp=1.0, tn=1.05):
        tau = tp if a > 0 else tn
        r = torch.exp(lp - o)
        return -(4.0 / tau) * (1.0 / (1.0 + torch.exp(-tau * (r - 1.0)))) * a
    check(SAPOClip(), per_token(tok))
    check(SAPOClip(tau_pos=2.0, tau_neg=0.5), per_token(lambda lp, o, a: tok(lp, o, a, 2.0, 0.5)), seed=1)


def test_sapo_gradient_at_ratio_one_is_the_plain_policy_gradient():
    # 4/tau * sigmoid'(0) * tau = 1: at w = 1 the gate's gradient is -A grad logp for any tau
    _, old, adv, mask = rollout(3)
    logp = torch.where(mask > 0, old, 0.0)  # on-policy: ratio exactly 1
    _, g_sapo, _ = lib(SAPOClip(tau_pos=3.0, tau_neg=0.3), logp, old, adv, mask)
    _, g_pg, _ = lib(NoClip(), logp, old, adv, mask)
    torch.testing.assert_close(g_sapo, g_pg, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_sapo, -adv / mask.sum(), rtol=1e-12, atol=1e-15)
    # away from w = 1 the gate shrinks the gradient: it is not the plain one any more
    _, g_off, _ = lib(SAPOClip(tau_pos=3.0, tau_neg=0.3), torch.where(mask > 0, old + 0.7, 0.0), old, adv, mask)
    _, g_pg_off, _ = lib(NoClip(), torch.where(mask > 0, old + 0.7, 0.0), old, adv, mask)
    assert not torch.allclose(g_off, g_pg_off)


def dppo_ref(kind, d_low, d_high, cap):
    # DPPO (arXiv 2602.04879): keep unless the sampled token's probability moved beyond the bound
    # in the direction A pushes; kept: -A sg(min(r, cap)) log r
    def tok(lp, o, a):
        p, po = math.exp(float(lp.detach())), math.exp(o)
        if kind == "tv":
            up, down = p - po > d_high, p - po < -d_low
        else:
            bkl = po * math.log(po / p) + (1 - po) * math.log((1 - po) / (1 - p))
            up, down = (bkl > d_high and p > po), (bkl > d_low and p < po)
        dropped = up if a > 0 else down
        r = torch.exp(lp - o)
        w = r.detach() if cap is None else torch.clamp(r.detach(), max=cap)
        return -a * w * (lp - o) * (0.0 if dropped else 1.0)
    return per_token(tok)


@pytest.mark.parametrize("kind,clip,args", [
    ("tv", DPPOTVClip(), (0.15, 0.15, None)),
    ("tv", DPPOTVClip(delta_low=0.05, delta_high=0.1, cap=1.5), (0.05, 0.1, 1.5)),
    ("kl", DPPOKLClip(), (0.05, 0.05, None)),
    ("kl", DPPOKLClip(delta_low=0.02, delta_high=0.08, cap=1.2), (0.02, 0.08, 1.2)),
])
def test_dppo_matches_reference(kind, clip, args):
    metrics = check(clip, dppo_ref(kind, *args), seed=4)
    assert metrics["clip/token_region"] > 0 and metrics["clip/token_outside"] >= metrics["clip/token_region"]


def test_topr_matches_reference():
    # TOPR (arXiv 2503.14286): A > 0: -A log pi; A <= 0: -sg(clip(r, 0, 1)) A log pi
    def tok(lp, o, a):
        r = torch.exp(lp - o)
        return -a * (lp - o) if a > 0 else -torch.clamp(r.detach(), 0.0, 1.0) * a * (lp - o)
    metrics = check(TOPRClip(), per_token(tok), seed=5)
    assert metrics["clip/token_outside"] > 0 and metrics["clip/token_region"] == 0


def test_topr_sequence_form_matches_reference():
    # the paper's sequence-level form: w = pi(y)/pi_old(y), loss_i = -w' A log pi(y) per sequence
    def row(lps, olds, advs):
        s = sum(lp - o for lp, o in zip(lps, olds))
        a = advs[0]
        w = torch.ones((), dtype=F64) if a > 0 else torch.clamp(torch.exp(s).detach(), 0.0, 1.0)
        return [-w * a * s]  # one sequence loss; seq_mean_token_mean divides by the length below
    logp, old, adv, mask = rollout(6, spread=0.2, row_constant_adv=True)
    from rlopt.algorithms import ProductRatio
    loss, grad, _ = lib(TOPRClip(), logp, old, adv, mask, ratio=ProductRatio(), agg=SeqMeanTokenMean())
    # reference: mean over sequences of the sequence loss
    n = mask.shape[0]
    leaves, total = {}, torch.zeros((), dtype=F64)
    for i in range(n):
        toks = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        if not toks:
            continue
        lps = [leaves.setdefault((i, t), torch.tensor(float(logp[i, t]), dtype=F64, requires_grad=True)) for t in toks]
        total = total + row(lps, [float(old[i, t]) for t in toks], [float(adv[i, t]) for t in toks])[0]
    total = total / n
    grads = torch.autograd.grad(total, list(leaves.values()))
    ref_grad = torch.zeros_like(grad)
    for (i, t), g in zip(leaves, grads):
        ref_grad[i, t] = g
    torch.testing.assert_close(loss, total.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_vespo_matches_reference():
    # VESPO (arXiv 2602.10693): phi(W) = W^k exp(lambda (1 - W)), W = prod_t r_t (log W clamped to
    # [log 1e-8, 20]), (k, lambda) by the sign of A; loss = -sg(phi) A log r_t
    def make(kp, lp_, kn, ln_):
        def row(lps, olds, advs):
            log_w = sum(float(lp.detach()) - o for lp, o in zip(lps, olds))
            w = math.exp(min(max(log_w, math.log(1e-8)), 20.0))
            out = []
            for lp, o, a in zip(lps, olds, advs):
                k, lam = (kp, lp_) if a >= 0 else (kn, ln_)
                phi = w ** k * math.exp(lam * (1.0 - w))
                out.append(-phi * a * (lp - o))
            return out
        return row
    check(VESPOClip(), make(2.0, 3.0, 3.0, 2.0), seed=7, spread=0.15)
    check(VESPOClip(k_pos=1.0, lambda_pos=0.5, k_neg=4.0, lambda_neg=1.5), make(1.0, 0.5, 4.0, 1.5), seed=8, spread=0.15)


def test_vespo_weight_is_one_on_policy_and_uses_the_sequence_product():
    _, old, adv, mask = rollout(9)
    on = torch.where(mask > 0, old, 0.0)
    phi = VESPOClip().weight(adv, on, old, mask)
    assert torch.allclose(phi[mask > 0], torch.ones_like(phi[mask > 0]))
    # a row whose token ratios multiply to 1 keeps phi = 1 although each token is off-policy
    lp = old.clone()
    lp[0, 0] += 0.3
    lp[0, 1] -= 0.3
    assert torch.allclose(VESPOClip().weight(adv, lp, old, mask)[0], torch.ones(mask.shape[1], dtype=F64))


def test_weight_abs_matches_reference():
    # CISPO with an absolute cap (TRL / ScaleRL): -sg(min(r, cap)) A log r
    def tok(lp, o, a, cap=1.05):
        return -torch.clamp(torch.exp(lp - o).detach(), max=cap) * a * (lp - o)
    metrics = check(WeightAbsClip(cap=1.05), per_token(tok), seed=10)
    assert metrics["clip/token_outside"] > 0
    check(WeightAbsClip(), per_token(lambda lp, o, a: tok(lp, o, a, 5.0)), seed=10)


def test_kimi15_matches_reference():
    # Kimi k1.5 (arXiv 2501.12599 eq. 3): -A log pi + tau/2 (log pi - log pi_old)^2
    check(Kimi15Loss(tau=0.3), per_token(lambda lp, o, a: -a * (lp - o) + 0.15 * (lp - o) ** 2), seed=11)


def test_pg_matches_reference():
    check(PolicyGradient(), per_token(lambda lp, o, a: -a * (lp - o)), seed=12)


def gmpo_row(eps_low, eps_high):
    # GMPO (arXiv 2507.20673): l~_t = min(l_t, eps_high) if A > 0, max(l_t, -eps_low) if A < 0,
    # 0 if A = 0; G = exp(mean_t l~_t); per token -A_t G
    def row(lps, olds, advs):
        lt = []
        for lp, o, a in zip(lps, olds, advs):
            d = lp - o
            if a > 0:
                lt.append(torch.clamp(d, max=eps_high))
            elif a < 0:
                lt.append(torch.clamp(d, min=-eps_low))
            else:
                lt.append(d * 0.0)
        g = torch.exp(sum(lt) / len(lt))
        return [-a * g for a in advs]
    return row


def test_gmpo_matches_reference():
    metrics = check(GMPOClip(eps_low=0.1, eps_high=0.15), gmpo_row(0.1, 0.15), seed=13, agg="seq_mean_token_mean",
                    lib_agg=SeqMeanTokenMean(), row_constant_adv=True)
    assert metrics["clip/token_region"] > 0
    check(GMPOClip(eps_low=0.2), gmpo_row(0.2, 0.2), seed=14, agg="seq_mean_token_mean", lib_agg=SeqMeanTokenMean())


def test_gmpo_with_infinite_clip_is_the_unclipped_geometric_mean_ratio():
    logp, old, adv, mask = rollout(15, row_constant_adv=True)
    inf = float("inf")
    l1, g1, _ = lib(GMPOClip(eps_low=inf, eps_high=inf), logp, old, adv, mask, agg=SeqMeanTokenMean())
    l2, g2, _ = lib(NoClip(), logp, old, adv, mask, ratio=SequenceRatio(), agg=SeqMeanTokenMean())
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_gmpo_differs_from_sequence_ratio_with_ppo_clip():
    # same bound (log 0.2 vs ratio e^0.2): clipping each token inside the mean is not clipping the mean
    logp, old, adv, mask = rollout(16, spread=0.6, row_constant_adv=True)
    eps = 0.2
    l1, g1, _ = lib(GMPOClip(eps_low=eps), logp, old, adv, mask, agg=SeqMeanTokenMean())
    ppo = PPOClip(eps_low=1 - math.exp(-eps), eps_high=math.exp(eps) - 1)
    l2, g2, _ = lib(ppo, logp, old, adv, mask, ratio=SequenceRatio(), agg=SeqMeanTokenMean())
    assert not torch.allclose(l1, l2) and not torch.allclose(g1, g2)


def test_registered_names():
    from rlopt.algorithms import ADVANTAGES, AGGREGATIONS, CLIPPING

    assert {"sapo", "dppo_tv", "dppo_kl", "topr", "vespo", "weight_abs", "kimi15", "gmpo", "pg"} <= set(CLIPPING.names())
    assert {"token_sum", "prompt_mean", "luspo"} <= set(AGGREGATIONS.names())
    assert {"reinforce_pp", "reinforce_pp_baseline", "gpg", "opo", "passk", "maxrl", "gdpo",
            "reward_norm"} <= set(ADVANTAGES.names())
    assert GroupBaseline().needs == () and GDPO.needs == ("reward_components",)


def test_needs_logp_strategies_refuse_a_call_without_them():
    r = torch.ones(2, 3)
    for clip in (DPPOTVClip(), DPPOKLClip(), VESPOClip(), GMPOClip()):
        assert clip.needs_logp
        with pytest.raises(ValueError, match="mask"):
            clip(r, r, r * 0)
    assert not SAPOClip().needs_logp and not TOPRClip().needs_logp


# --- aggregation axis --------------------------------------------------------------------------

def agg_reference(name, values, mask, g=None):
    n, t = mask.shape
    v = values.clone().requires_grad_(True)
    if name == "token_sum":
        total = sum(v[i, k] for i in range(n) for k in range(t) if mask[i, k] > 0)
    elif name == "luspo":  # LUSPO (arXiv 2602.05261): mean_i(|y_i| * mean_t l_it)
        total = 0.0
        for i in range(n):
            toks = [k for k in range(t) if mask[i, k] > 0]
            if toks:
                total = total + len(toks) * (sum(v[i, k] for k in toks) / len(toks))
        total = total / n
    elif name == "prompt_mean":  # ScaleRL: mean over prompts of the prompt's token mean
        total = 0.0
        for p in range(n // g):
            toks = [(i, k) for i in range(p * g, (p + 1) * g) for k in range(t) if mask[i, k] > 0]
            if toks:
                total = total + sum(v[i, k] for i, k in toks) / len(toks)
        total = total / (n // g)
    (grad,) = torch.autograd.grad(total, v)
    return total.detach(), grad


AGGS = {"token_sum": lambda g: TokenSum(), "luspo": lambda g: LUSPOAggregation(), "prompt_mean": lambda g: PromptMean(g)}


@pytest.mark.parametrize("name", sorted(AGGS))
def test_new_aggregations_match_reference(name):
    _, _, _, mask = rollout(20, n=8)
    values = torch.randn(8, mask.shape[1], dtype=F64, generator=torch.Generator().manual_seed(1))
    values = torch.where(mask > 0, values, torch.full_like(values, float("nan")))  # padding ignored
    v = values.clone().requires_grad_(True)
    out = AGGS[name](2)(v, mask)
    (grad,) = torch.autograd.grad(out, v)
    ref, ref_grad = agg_reference(name, torch.where(mask > 0, values, 0.0), mask, g=2)
    assert out.dtype == F64
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.where(mask > 0, grad, 0.0), ref_grad, rtol=1e-12, atol=1e-14)
    assert (grad[mask == 0] == 0).all()


@pytest.mark.parametrize("name", sorted(AGGS))
def test_minibatch_losses_add_up_to_the_one_batch_loss(name):
    # the global-normaliser contract: each minibatch divides its sum by count() of the whole batch
    g, n = 3, 12
    gen = torch.Generator().manual_seed(21)
    lens = torch.randint(0, 6, (n,), generator=gen)
    mask = (torch.arange(5)[None] < lens[:, None]).to(F64)
    values = torch.randn(n, 5, dtype=F64, generator=gen)
    agg = AGGS[name](g)
    full = agg(values, mask)
    norm = agg.count(mask)
    if name == "prompt_mean":  # whole groups, in a shuffled order
        groups = torch.randperm(n // g, generator=gen)
        parts = [torch.cat([torch.arange(p * g, (p + 1) * g) for p in groups[k::2]]) for k in range(2)]
    else:
        perm = torch.randperm(n, generator=gen)
        parts = [perm[:5], perm[5:7], perm[7:]]
    total = sum(agg(values[idx], mask[idx], normalizer=norm) for idx in parts)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-14)
    assert full.abs() > 0


def test_prompt_mean_with_equal_lengths_is_token_mean_and_differs_otherwise():
    values = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    full = torch.ones(8, 4, dtype=F64)
    torch.testing.assert_close(PromptMean(4)(values, full), TokenMean()(values, full), rtol=1e-13, atol=1e-15)
    ragged = full.clone()
    ragged[0, 1:] = 0
    ragged[5, 2:] = 0
    assert not torch.allclose(PromptMean(4)(values, ragged), TokenMean()(values, ragged))


def test_luspo_equals_seq_mean_token_sum_and_token_sum_ignores_the_normaliser():
    _, _, _, mask = rollout(22)
    values = torch.randn_like(mask)
    torch.testing.assert_close(LUSPOAggregation()(values, mask), SeqMeanTokenSum()(values, mask))
    assert TokenSum()(values, mask, normalizer=123.0) == (values * mask).sum()
    with pytest.raises(ValueError, match="group_size"):
        PromptMean()(values, mask)
    with pytest.raises(ValueError, match="does not divide"):
        PromptMean(4)(values, mask)


# --- advantage axis ----------------------------------------------------------------------------

def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # unbiased
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def adv_data(seed=30, n=8, t=5, g=4):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, t + 1, (n,), generator=gen)
    lens[3] = 0
    mask = (torch.arange(t)[None] < lens[:, None]).to(F64)
    rewards = torch.randint(0, 4, (n,), generator=gen).to(F64) / 3
    rewards[4:8] = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=F64)  # a tied group
    valid = torch.ones(n, dtype=torch.bool)
    valid[1] = False
    rewards[1] = float("nan")  # an invalid sample's reward is never read
    kl = torch.randn(n, t, dtype=F64, generator=gen) * 0.3 * mask
    return rewards, mask, valid, kl, g


def rpp_reference(rewards, mask, valid, kl, g, kl_coef, gamma, eps, baseline):
    # REINFORCE++ (arXiv 2501.03262): r_t = R [t = last] - beta KL_t, G_t = sum gamma^(k-t) r_k,
    # whitened over all valid tokens of the batch; -baseline: R - mean_group(R) first
    n, t = mask.shape
    r = [float(x) for x in rewards]
    if baseline:
        for p in range(n // g):
            idx = [i for i in range(p * g, (p + 1) * g) if valid[i]]
            vals = [r[i] for i in idx]
            m = _mean(vals)
            for i in idx:
                r[i] = 0.0 if max(vals) == min(vals) else r[i] - m
    rets = {}
    for i in range(n):
        toks = [k for k in range(t) if mask[i, k] > 0]
        if not valid[i] or not toks:
            continue
        run = 0.0
        for k in reversed(toks):
            rt = (r[i] if k == toks[-1] else 0.0) - kl_coef * float(kl[i, k])
            run = rt + gamma * run
            rets[i, k] = run
    mu, sd = _mean(list(rets.values())), _std(list(rets.values()))
    out = torch.zeros(n, t, dtype=F64)
    for (i, k), v in rets.items():
        out[i, k] = (v - mu) / (sd + eps)
    return out


def test_reinforce_pp_matches_reference():
    rewards, mask, valid, kl, g = adv_data()
    est = ReinforcePP(kl_coef=0.1, gamma=0.9, eps=1e-6)
    out = est(rewards, mask, valid=valid, kl=kl)
    assert out.dtype == F64
    torch.testing.assert_close(out, rpp_reference(rewards, mask, valid, kl, g, 0.1, 0.9, 1e-6, False))
    assert est.needs == ("kl",) and ReinforcePP(kl_coef=0.0).needs == ()


def test_reinforce_pp_baseline_matches_reference():
    rewards, mask, valid, kl, g = adv_data(31)
    for coef in (0.0, 0.2):
        out = ReinforcePPBaseline(kl_coef=coef)(rewards, mask, group_size=g, valid=valid, kl=kl)
        torch.testing.assert_close(out, rpp_reference(rewards, mask, valid, kl, g, coef, 1.0, 1e-6, True))


def test_reinforce_pp_without_kl_warns_and_uses_zero():
    rewards, mask, valid, _, _ = adv_data(32)
    est = ReinforcePP(kl_coef=0.5)
    with pytest.warns(RuntimeWarning, match="kl"):
        out = est(rewards, mask, valid=valid)
    torch.testing.assert_close(out, ReinforcePP(kl_coef=0.0)(rewards, mask, valid=valid))


def group_rows(n, g):
    return [list(range(p * g, (p + 1) * g)) for p in range(n // g)]


def group_centred(r, valid, g, eps=None):
    """Per valid row ``r_i - mean_g`` (divided by ``std_g + eps`` unless eps is None) over the valid
    rows of its group; 0 for invalid rows and for groups whose valid rewards are all equal."""
    out = [0.0] * len(valid)
    for rows in group_rows(len(valid), g):
        idx = [i for i in rows if valid[i]]
        vals = [float(r[i]) for i in idx]
        if max(vals) == min(vals):
            continue
        m, s = _mean(vals), _std(vals)
        for i in idx:
            out[i] = (float(r[i]) - m) / (1.0 if eps is None else s + eps)
    return out


@pytest.mark.parametrize("std_normalize,count", [(False, "advantage"), (True, "advantage"), (False, "reward")])
def test_gpg_matches_reference(std_normalize, count):
    # GPG (arXiv 2504.02546): A = alpha (R - mean_g) / F, alpha = B / #non-zero
    rewards, mask, valid, _, g = adv_data(33)
    rewards[0:4] = torch.tensor([0.0, float("nan"), 1.0, 0.0], dtype=F64)
    n = len(rewards)
    a = group_centred(rewards, valid, g, 1e-6 if std_normalize else None)
    b = sum(1 for i in range(n) if valid[i])
    nz = sum(1 for i in range(n) if valid[i] and (a[i] != 0 if count == "advantage" else float(rewards[i]) != 0))
    ref = torch.tensor([b / nz * x for x in a], dtype=F64)[:, None] * mask
    out = GPG(std_normalize=std_normalize, count=count)(rewards, mask, group_size=g, valid=valid)
    torch.testing.assert_close(out, ref)
    assert b / nz > 1  # the tied group makes alpha > 1


def test_opo_matches_reference():
    # OPO (arXiv 2505.23585): b = sum |y_i| R_i / sum |y_i| over the group
    rewards, mask, valid, _, g = adv_data(34)
    n = len(rewards)
    ref = torch.zeros(n, dtype=F64)
    for rows in group_rows(n, g):
        idx = [i for i in rows if valid[i]]
        vals = [float(rewards[i]) for i in idx]
        if max(vals) == min(vals):
            continue
        lens = [float(mask[i].sum()) for i in idx]
        b = sum(L * r for L, r in zip(lens, vals)) / sum(lens)
        for i in idx:
            ref[i] = float(rewards[i]) - b
    out = OPO()(rewards, mask, group_size=g, valid=valid)
    torch.testing.assert_close(out, ref[:, None] * mask)
    plain = GroupBaseline(scale="none")(rewards, mask, group_size=g, valid=valid)
    assert not torch.allclose(out, plain)  # the length weighting matters on this batch


def passk_reference(rewards, valid, g, scale, eps=1e-6):
    n = len(rewards)
    out = [0.0] * n
    for rows in group_rows(n, g):
        idx = [i for i in rows if valid[i]]
        if len(idx) < 2:
            continue
        vals = sorted((float(rewards[i]) for i in idx), reverse=True)
        best = max(idx, key=lambda i: (float(rewards[i]), -i))
        gap = vals[0] - vals[1]
        sd = _std([float(rewards[i]) for i in idx])
        out[best] = gap / (sd + eps) if (scale == "group" and gap != 0) else (gap if scale == "none" else 0.0)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("scale", ["group", "none"])
def test_passk_matches_reference(scale):
    rewards, mask, valid, _, g = adv_data(35)
    ones = torch.ones(len(rewards), 1, dtype=F64)
    out = PassK(scale=scale)(rewards, ones, group_size=g, valid=valid)[:, 0]
    torch.testing.assert_close(out, passk_reference(rewards, valid, g, scale))


def test_passk_credits_only_a_single_best_sample():
    r = torch.tensor([0.2, 0.9, 0.5, 0.1, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    ones = torch.ones(8, 1, dtype=F64)
    out = PassK(scale="none")(r, ones, group_size=4)[:, 0]
    torch.testing.assert_close(out, torch.tensor([0, 0.4, 0, 0, 0, 0, 0, 0], dtype=F64))  # a tie at the top: none
    out = PassK()(r, ones, group_size=4)[:, 0]
    assert out[1] == pytest.approx(0.4 / (_std([0.2, 0.9, 0.5, 0.1]) + 1e-6)) and (out[[0, 2, 3]] == 0).all()


def test_maxrl_matches_reference():
    # MaxRL (arXiv 2602.02710): (R - mean) / mean
    rewards, mask, valid, _, g = adv_data(36)
    rewards[0], rewards[2], rewards[3] = 0.0, 0.0, 0.0  # group 0 all failed (valid ones): A = 0
    n = len(rewards)
    ref = torch.zeros(n, dtype=F64)
    for rows in group_rows(n, g):
        idx = [i for i in rows if valid[i]]
        vals = [float(rewards[i]) for i in idx]
        m = _mean(vals)
        if max(vals) == min(vals) or m <= 0:
            continue
        for i in idx:
            ref[i] = (float(rewards[i]) - m) / (m + 1e-6)
    out = MaxRL()(rewards, mask, group_size=g, valid=valid)
    torch.testing.assert_close(out, ref[:, None] * mask)


def gdpo_reference(comps, weights, valid, g, batch_norm, eps=1e-6):
    # GDPO (arXiv 2601.05242): sum_k w_k (r_k - mean_g) / (std_g + eps), then batch whitening
    n = len(valid)
    total = [0.0] * n
    for name, r in comps.items():
        for i, z in enumerate(group_centred(r, valid, g, eps)):
            total[i] += weights.get(name, 1.0) * z
    if batch_norm:
        vals = [total[i] for i in range(n) if valid[i]]
        m, s = _mean(vals), _std(vals)
        total = [(x - m) / (s + eps) if valid[i] else 0.0 for i, x in enumerate(total)]
    return torch.tensor(total, dtype=F64)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_gdpo_matches_reference(batch_norm):
    rewards, mask, valid, _, g = adv_data(37)
    gen = torch.Generator().manual_seed(5)
    comps = {"acc": torch.randint(0, 2, (8,), generator=gen).to(F64),
             "fmt": torch.rand(8, generator=gen, dtype=F64) * 3}
    weights = {"acc": 2.0}
    out = GDPO(batch_norm=batch_norm)(rewards, mask, group_size=g, valid=valid, reward_components=comps,
                                      reward_weights=weights)
    torch.testing.assert_close(out, gdpo_reference(comps, weights, valid, g, batch_norm)[:, None] * mask)
    # normalise-then-sum is not sum-then-normalise (TRL's default, the group baseline of the sum)
    summed = GroupBaseline()(2.0 * comps["acc"] + comps["fmt"], mask, group_size=g, valid=valid)
    assert not torch.allclose(out, summed)


def test_gdpo_with_one_reward_function_is_the_group_baseline():
    rewards, mask, valid, _, g = adv_data(38)
    base = GroupBaseline()(rewards, mask, group_size=g, valid=valid)
    out = GDPO(batch_norm=False)(rewards, mask, group_size=g, valid=valid, reward_components={"only": rewards})
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    out = GDPO(batch_norm=False)(rewards, mask, group_size=g, valid=valid, reward_components={"only": rewards},
                                 reward_weights={"only": 2.0})
    torch.testing.assert_close(out, 2 * base)
    with pytest.warns(RuntimeWarning, match="reward_components"):
        fallback = GDPO(batch_norm=False)(rewards, mask, group_size=g, valid=valid)
    torch.testing.assert_close(fallback, base)
    with pytest.raises(ValueError, match="reward_weights"):
        GDPO()(rewards, mask, group_size=g, valid=valid, reward_components={"a": rewards}, reward_weights={"b": 1.0})


def test_reward_norm_levels_and_running_state():
    rewards, mask, valid, _, g = adv_data(39)
    ones = torch.ones(8, 1, dtype=F64)
    vals = [float(rewards[i]) for i in range(8) if valid[i]]
    m, s = _mean(vals), _std(vals)
    out = RewardNorm(mean="batch", std="batch")(rewards, ones, valid=valid)[:, 0]
    ref = torch.tensor([(float(rewards[i]) - m) / (s + 1e-6) if valid[i] else 0.0 for i in range(8)], dtype=F64)
    torch.testing.assert_close(out, ref)
    # group mean, batch std: Lite PPO / TRL scale_rewards="batch" (the existing batch_std option)
    torch.testing.assert_close(RewardNorm(mean="group", std="batch")(rewards, mask, group_size=g, valid=valid),
                               GroupBaseline(scale="batch")(rewards, mask, group_size=g, valid=valid))
    # running: step 1 is the batch; step 2 is an EMA with momentum 0.25 of mean and variance
    est = RewardNorm(mean="running", std="running", momentum=0.25)
    torch.testing.assert_close(est(rewards, ones, valid=valid)[:, 0], ref)
    r2 = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0, 1.0, 0.5, 2.5], dtype=F64)
    m2, s2 = _mean(r2.tolist()), _std(r2.tolist())
    rm, rv = 0.75 * m + 0.25 * m2, 0.75 * s ** 2 + 0.25 * s2 ** 2
    state = est.state_dict()
    out2 = est(r2, ones)[:, 0]
    torch.testing.assert_close(out2, (r2 - rm) / (math.sqrt(rv) + 1e-6))
    assert est.state_dict()["steps"] == 2
    again = RewardNorm(mean="running", std="running", momentum=0.25)
    again.load_state_dict(state)  # a resumed run continues exactly
    torch.testing.assert_close(again(r2, ones)[:, 0], out2)
    cum = RewardNorm(mean="running", std="none", momentum=None)
    cum(rewards, ones, valid=valid)
    torch.testing.assert_close(cum(r2, ones)[:, 0], r2 - (m + m2) / 2)  # equal weight per step


def run_ranks(make, rewards, mask, g, world=2, **kw):
    """Each rank a thread holding whole groups; reduce_sum is an exact all-reduce over the threads."""
    n = len(rewards)
    rows = torch.arange(n).view(world, -1)
    buf, out, errors = [None] * world, [None] * world, []
    barrier = threading.Barrier(world, timeout=20)

    def rank(k):
        def reduce_sum(x):
            buf[k] = x.detach().clone()
            barrier.wait()
            total = sum(buf[j] for j in range(world))
            barrier.wait()
            return total
        try:
            idx = rows[k]
            extra = {key: ({c: v[idx] for c, v in val.items()} if isinstance(val, dict) and key != "reward_weights"
                           else (val[idx] if torch.is_tensor(val) else val)) for key, val in kw.items()}
            out[k] = make()(rewards[idx], mask[idx], group_size=g, reduce_sum=reduce_sum, **extra)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(k,)) for k in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return torch.cat(out)


@pytest.mark.parametrize("name,make,kw", [
    ("reinforce_pp", lambda: ReinforcePP(kl_coef=0.1), ("valid", "kl")),
    ("reinforce_pp_baseline", lambda: ReinforcePPBaseline(kl_coef=0.1), ("valid", "kl")),
    ("gpg", lambda: GPG(), ("valid",)),
    ("gdpo", lambda: GDPO(), ("valid", "reward_components")),
    ("reward_norm_batch", lambda: RewardNorm(mean="batch", std="batch"), ("valid",)),
    ("reward_norm_running", lambda: RewardNorm(mean="running", std="running"), ("valid",)),
])
def test_batch_statistics_are_exact_across_ranks(name, make, kw):
    rewards, mask, valid, kl, g = adv_data(40)
    rewards = torch.nan_to_num(rewards)
    comps = {"a": rewards, "b": torch.arange(8, dtype=F64) % 3}
    avail = {"valid": valid, "kl": kl, "reward_components": comps}
    args = {k: avail[k] for k in kw}
    one = make()(rewards, mask, group_size=g, **args)
    split = run_ranks(make, rewards, mask, g, **args)
    torch.testing.assert_close(split, one, rtol=1e-12, atol=1e-14)
    assert one.abs().sum() > 0


# --- regularisers ------------------------------------------------------------------------------

def test_adaptive_entropy_coefficient_steps_toward_the_target():
    # Skywork-OR1 (arXiv 2505.22312): c += delta if H <= target else -= delta, clamped to [min, max]
    ctrl = AdaptiveEntropyCoef(coef=0.0, target=0.5, delta=0.1, min=0.0, max=0.25, gate=False)
    got = [ctrl.step(h) for h in (0.4, 0.3, 0.6, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.5)]
    assert got == pytest.approx([0.1, 0.2, 0.1, 0.2, 0.25, 0.25, 0.15, 0.05, 0.0, 0.0, 0.1])  # at the target: up
    gated = AdaptiveEntropyCoef(coef=0.0, target=0.5, delta=0.1, max=1.0, gate=True)
    assert [gated.step(h) for h in (0.4, 0.3, 0.6)] == pytest.approx([0.1, 0.2, 0.0])  # above target: no bonus
    assert gated.coef == pytest.approx(0.1)
    resumed = AdaptiveEntropyCoef(coef=0.0, target=0.5, delta=0.1, max=1.0, gate=True)
    resumed.load_state_dict(gated.state_dict())
    assert resumed.value == gated.value == 0.0 and resumed.step(0.2) == gated.step(0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="NaN"):
        ctrl.step(float("nan"))


def test_adaptive_entropy_config_builds_the_controller():
    from omegaconf import OmegaConf

    from rlopt.resources import config_dir

    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(config_dir(), "entropy", "adaptive.yaml")))
    assert cfg["adaptive"] is True and {"coef", "target", "delta", "min", "max"} <= set(cfg)
    ctrl = AdaptiveEntropyCoef.from_config(cfg)
    assert (ctrl.coef, ctrl.target, ctrl.delta, ctrl.min, ctrl.max) == (0.0, 0.2, 0.005, 0.0, 1.0)
    assert preset_spec("adaptive_entropy")["entropy"]["adaptive"] is True


def test_mix_reference_moves_the_reference_toward_the_policy_in_place():
    # TRL sync_ref_model: ref = alpha * policy + (1 - alpha) * ref
    torch.manual_seed(0)
    pol, ref = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    before = [p.detach().clone() for p in ref.parameters()]
    ids = [id(p) for p in ref.parameters()]
    mix_reference_(ref.parameters(), pol.parameters(), alpha=0.25)
    for b, r, p in zip(before, ref.parameters(), pol.parameters()):
        torch.testing.assert_close(r.detach(), 0.25 * p.detach() + 0.75 * b, rtol=1e-15, atol=1e-15)
        assert r.grad is None
    assert ids == [id(p) for p in ref.parameters()]
    mix_reference_(ref.parameters(), pol.parameters(), alpha=1.0)
    assert all(torch.equal(r, p) for r, p in zip(ref.parameters(), pol.parameters()))
    with pytest.raises(ValueError, match="alpha"):
        mix_reference_(ref.parameters(), pol.parameters(), alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        mix_reference_([torch.zeros(2)], [torch.zeros(3)], alpha=0.5)


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("make,param", [
    (lambda: SAPOClip(tau_pos=0.0), "tau_pos"), (lambda: SAPOClip(tau_neg=-1.0), "tau_neg"),
    (lambda: DPPOTVClip(delta_low=0.0), "delta_low"), (lambda: DPPOTVClip(delta_high=1.5), "delta_high"),
    (lambda: DPPOKLClip(delta_high=-0.1), "delta_high"), (lambda: DPPOKLClip(cap=0.0), "cap"),
    (lambda: VESPOClip(k_pos=-1.0), "k_pos"), (lambda: VESPOClip(lambda_neg=-1.0), "lambda_neg"),
    (lambda: WeightAbsClip(cap=0.0), "cap"), (lambda: Kimi15Loss(tau=-0.1), "tau"),
    (lambda: GMPOClip(eps_low=0.0), "eps_low"), (lambda: GMPOClip(eps_high=-1.0), "eps_high"),
    (lambda: PromptMean(group_size=0), "group_size"),
    (lambda: ReinforcePP(gamma=0.0), "gamma"), (lambda: ReinforcePP(kl_coef=-1.0), "kl_coef"),
    (lambda: ReinforcePPBaseline(eps=-1.0), "eps"), (lambda: GPG(count="rows"), "count"),
    (lambda: PassK(scale="batch"), "scale"), (lambda: MaxRL(eps=-1.0), "eps"), (lambda: GDPO(std="x"), "std"),
    (lambda: RewardNorm(mean="x"), "mean"), (lambda: RewardNorm(mean="batch", std="group"), "std"),
    (lambda: RewardNorm(momentum=0.0), "momentum"),
    (lambda: AdaptiveEntropyCoef(coef=2.0), "coef"), (lambda: AdaptiveEntropyCoef(min=0.5, max=0.1), "max"),
    (lambda: AdaptiveEntropyCoef(delta=-1.0), "delta"),
])
def test_parameter_errors_name_the_parameter(make, param):
    with pytest.raises(ValueError, match=param):
        make()


def test_group_estimators_need_groups():
    _, mask, _, _, _ = adv_data()
    for est in (ReinforcePPBaseline(), GPG(), OPO(), PassK(), MaxRL(), GDPO(), RewardNorm()):
        with pytest.raises(ValueError, match="group_size"):
            est(torch.zeros(8, dtype=F64), mask)
    assert not RewardNorm(mean="batch").requires_groups and not ReinforcePP().requires_groups


# --- presets -----------------------------------------------------------------------------------

NEW_PRESETS = ["sapo", "gmpo", "dppo_tv", "dppo_kl", "topr", "vespo", "luspo", "cispo_abs", "kimi15", "reinforce_pp",
               "reinforce_pp_baseline", "gpg", "opo", "passk", "maxrl", "gdpo", "lite_ppo", "adaptive_entropy"]


def test_new_presets_exist_and_have_their_sources_settings():
    assert set(NEW_PRESETS) <= set(preset_names())
    spec = {n: preset_spec(n) for n in NEW_PRESETS}
    assert (spec["sapo"]["clip"]["tau_pos"], spec["sapo"]["clip"]["tau_neg"]) == (1.0, 1.05)
    assert spec["gmpo"]["clip"]["eps_low"] == 0.4 and spec["gmpo"]["clip"]["name"] == "gmpo"
    assert spec["dppo_tv"]["clip"]["delta_high"] == 0.15 and spec["dppo_kl"]["clip"]["delta_high"] == 0.05
    assert spec["dppo_tv"]["advantage"]["scale"] == "none"
    assert spec["cispo_abs"]["clip"]["cap"] == 5.0 and spec["kimi15"]["clip"]["tau"] == 0.1
    assert (spec["vespo"]["clip"]["k_pos"], spec["vespo"]["clip"]["lambda_pos"]) == (2.0, 3.0)
    assert spec["lite_ppo"]["advantage"]["scale"] == "batch" and spec["lite_ppo"]["aggregation"]["name"] == "token_mean"
    assert spec["topr"]["ratio"]["name"] == "product" and spec["luspo"]["aggregation"]["name"] == "luspo"
    assert all(spec[n]["kl"]["estimator"] is None for n in NEW_PRESETS)


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_presets_train_a_step_on_random_data(name):
    est, obj = build_preset(name)
    gen = torch.Generator().manual_seed(len(name))
    n, t, g = 8, 6, 4
    lens = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t)[None] < lens[:, None]).float()
    old = -torch.rand(n, t, generator=gen) * 3 - 0.01
    kw = {}
    if "kl" in est.needs:
        kw["kl"] = torch.randn(n, t, generator=gen) * 0.1 * mask
    if "reward_components" in est.needs:
        kw["reward_components"] = {"a": torch.rand(n, generator=gen), "b": torch.rand(n, generator=gen)}
    adv = est(torch.rand(n, generator=gen), mask, group_size=g, **kw)
    x = (old + 0.1 * torch.randn(n, t, generator=gen)).clamp(max=-1e-3).requires_grad_(True)
    if getattr(obj.aggregation, "max_len", "unset") is None:
        obj.aggregation.max_len = t
    loss, metrics = obj(x, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in metrics.values())


# --- docs/peer-names.md ------------------------------------------------------------------------

PEER_DOC = os.path.join(ROOT, "docs", "peer-names.md")

# Every value the peers expose for these keys (peer, key fragment, values) must have a row.
REQUIRED = {
    ("TRL", "loss_type"): {"grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"},
    ("TRL", "importance_sampling_level"): {"token", "sequence"},
    ("TRL", "scale_rewards"): {"group", "batch", "none"},
    ("TRL", "multi_objective_aggregation"): {"sum_then_normalize", "normalize_then_sum"},
    ("TRL", "vllm_importance_sampling_mode"): {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask"},
    ("verl", "loss_mode"): {"vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean",
                            "dro", "cispo", "bypass_mode"},
    ("verl", "adv_estimator"): {"gae", "grpo", "grpo_vectorized", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                "remax", "rloo", "rloo_vectorized", "opo", "grpo_passk", "gpg", "optimal_token_baseline",
                                "tir_optimal_token_baseline", "gdpo"},
    ("verl", "loss_agg_mode"): {"token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                "seq-mean-token-mean"},
    ("verl", "kl_penalty"): {"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full", "k3+"},
    ("verl", "rollout_correction"): {"decoupled_token_is", "decoupled_seq_is", "decoupled_token_icepop",
                                     "decoupled_geo_rs", "bypass_ppo_clip", "bypass_pg_is", "bypass_pg_geo_rs_seq_tis"},
    ("OpenRLHF", "estimator"): {"gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo"},
    ("OpenRLHF", "policy_loss_type"): {"ppo", "gspo"},
    ("OpenRLHF", "kl.estimator"): {"k1", "k2", "k3"},
    ("OpenRLHF", "is_correction_type"): {"tis", "icepop", "seq-mask-tis"},
    ("slime", "advantage-estimator"): {"grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                       "ppo"},
    ("slime", "kl-loss-type"): {"k1", "k2", "k3", "low_var_kl"},
    ("SkyRL", "policy_loss_type"): {"regular", "dual_clip", "gspo", "cispo", "rollout_is", "clip_cov", "kl_cov", "sapo",
                                    "cross_entropy", "importance_sampling", "dppo"},
    ("SkyRL", "advantage_estimator"): {"gae", "grpo", "rloo", "reinforce++", "maxrl"},
    ("SkyRL", "loss_reduction"): {"token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm",
                                  "prompt_mean"},
}


def peer_rows() -> list[tuple[str, str, str, str, str]]:
    rows = []
    with open(PEER_DOC) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("|") or re.match(r"^\|\s*-", line):
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0].lower() == "peer":
                continue
            assert len(cells) == 5, line
            rows.append(tuple(cells))
    return rows


def _strip(cell: str) -> str:
    return cell.strip("`").strip()


def test_peer_names_table_covers_every_peer_value():
    rows = peer_rows()
    seen: dict[tuple[str, str], set[str]] = {}
    for peer, key, value, override, notes in rows:
        assert override == "missing" or re.fullmatch(r"`[^`]+`", override), (peer, key, value, override)
        assert notes or override != "missing", (peer, key, value)  # a missing value says why
        for (p, k) in REQUIRED:
            if peer == p and k in key:
                seen.setdefault((p, k), set()).add(_strip(value))
    for k, values in REQUIRED.items():
        assert values <= seen.get(k, set()), (k, values - seen.get(k, set()))


def test_peer_names_overrides_compose_and_build(tmp_path):
    """Each distinct override span of the table, composed like ``conftest.compose_train`` (the
    debug base, output in tmp) and checked by ``check_config``. One Hydra context for all spans:
    ``compose_train`` re-initialises Hydra per call, which made this test ~2x slower."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from rlopt.conf import check_config
    from rlopt.train import CONFIG_DIR

    from .conftest import QUIET, _key

    overrides = sorted({_strip(r[3]) for r in peer_rows() if r[3] != "missing"})
    assert len(overrides) > 30
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        for i, ov in enumerate(overrides):
            mine = ov.split()
            keys = {_key(o) for o in mine}
            out = tmp_path / f"run{i}"
            args = [o for o in (*QUIET, f"output_dir={out}", "run_name=test") if _key(o) not in keys] + mine
            try:
                cfg = compose("train", overrides=args, return_hydra_config=True)
                with open_dict(cfg):
                    cfg.hydra.runtime.output_dir = str(out)
                HydraConfig().set_config(cfg)
                check_config(cfg)
            except Exception as e:  # noqa: BLE001 - re-raised naming the row
                raise AssertionError(f"docs/peer-names.md override `{ov}` does not build: {e}") from e
