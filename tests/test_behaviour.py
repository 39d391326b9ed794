"""The three policies (sampler mu, pi_old, pi_theta): behaviour corrections, token masks, the KL
options, and their wiring into ``PolicyObjective`` (docs/behaviour-correction.md).

Every component is checked against a naive float64 reference written here with Python loops from
the paper's formula (the library's vectorised code is not reused), for the value and, through
torch scalars, the gradient. Identities, the all-removed edge case, padding garbage and a
simulated two-rank gather complete the checks.
"""

import itertools
import math

import pytest
import torch

from rlopt.algorithms import (
    CORRECTIONS, MASKS, Bypass, ClipCovMask, DecoupledPPO, HighEntropyMask, KLCovPenalty, M2POMask,
    MaskedIS, MaskInputs, NoClip, NoCorrection, OPSMMask, PolicyObjective, PPOClip, RejectionSampling,
    TruncatedIS, TruncatedMask, build_preset, kl_k3_plus, preset_spec,
)

F64 = torch.float64
EPS = 0.2  # the PPO clip of the objective tests


# --- data -------------------------------------------------------------------------------------

def make_batch(seed, n=6, t=7, mismatch=0.3, spread=0.3):
    """logp (pi_theta), old (pi_old), mu (sampler), adv, mask, entropy, truncated; padding zeroed."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, t + 1, (n,), generator=g)
    lens[0] = t
    lens[-1] = max(int(lens[-1]), 2)
    mask = (torch.arange(t)[None] < lens[:, None]).to(F64)
    old = -torch.rand(n, t, generator=g, dtype=F64) * 3 - 0.05
    mu = old + mismatch * torch.randn(n, t, generator=g, dtype=F64)
    logp = old + spread * torch.randn(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, 1, generator=g, dtype=F64).expand(n, t).clone()  # sequence-constant (GRPO)
    adv[0] = adv[0].abs() + 0.1
    adv[1] = -adv[1].abs() - 0.1
    ent = torch.rand(n, t, generator=g, dtype=F64) * 3
    truncated = lens == t
    for x in (old, mu, logp, adv, ent):
        x[mask == 0] = 0.0
    return dict(logp=logp, old=old, mu=mu, adv=adv * mask, mask=mask, ent=ent, truncated=truncated)


def rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[i, t] > 0] for i in range(mask.shape[0])]


# --- naive references (Python loops on floats) ---------------------------------------------------

def ref_level_log_ratio(x, toks, level):
    """{t: log-ratio at level} for one sequence, x = {t: log pi_old - log mu}."""
    if not toks:
        return {}
    if level == "token":
        return dict(x)
    total = sum(x[t] for t in toks)
    val = total if level == "sequence" else total / len(toks)
    return {t: val for t in toks}


def clamp(v, lo, hi):
    return min(max(v, lo), hi)


def ref_correction(kind, old, mu, mask, **p):
    """(weight, keep) lists of lists from the formulas of behaviour.py's docstrings."""
    n, t_max = mask.shape
    old_l, mu_l = old.tolist(), mu.tolist()
    weight = [[0.0] * t_max for _ in range(n)]
    keep = [[False] * t_max for _ in range(n)]
    for i, toks in enumerate(rows(mask)):
        x = {t: old_l[i][t] - mu_l[i][t] for t in toks}
        if kind == "rejection":  # Schulman's k1/k2/k3 of KL(mu || pi_old), x clamped to +-20
            xc = {t: clamp(x[t], -20, 20) for t in toks}
            tok = {t: {"k1": -xc[t], "k2": 0.5 * xc[t] ** 2, "k3": math.exp(xc[t]) - 1 - xc[t]}[p["statistic"]]
                   for t in toks}
            if p["agg"] == "token":
                stat = tok
            else:
                vals = [tok[t] for t in toks]
                s = {"sum": sum(vals), "mean": sum(vals) / max(len(vals), 1),
                     "max": max(vals) if vals else 0.0}[p["agg"]]
                stat = {t: s for t in toks}
            for t in toks:
                ok = (p["lo"] is None or stat[t] >= p["lo"]) and (p["hi"] is None or stat[t] <= p["hi"])
                keep[i][t], weight[i][t] = ok, 1.0 if ok else 0.0
            continue
        lr = ref_level_log_ratio(x, toks, p.get("level", "token"))
        for t in toks:
            raw = math.exp(lr[t])
            rho = math.exp(clamp(lr[t], -20, 20))
            if kind == "tis":  # min(pi_old/mu, C)
                w, k = min(rho, p["cap"]), True
            elif kind == "mis":  # rho * 1[lo <= rho <= hi]
                k = p["lo"] <= raw <= p["hi"]
                w = rho if k else 0.0
            elif kind == "decoupled":  # AReaL: pi_prox/mu, masked or truncated above the cap
                if p.get("mode", "mask") == "truncate":
                    w, k = min(rho, p["cap"]), True
                else:
                    k = raw <= p["cap"]
                    w = rho if k else 0.0
            elif kind in ("none", "bypass"):
                w, k = 1.0, True
            weight[i][t], keep[i][t] = w, k
    return weight, keep


def ref_policy_loss(logp, old, adv, mask, weight, agg, clip=True, penalty=None, step_keep=None, normalizer=None):
    """sum_i,t w_t * keep_t * (PPO token loss + penalty_t) / normaliser, by loops; ``logp`` is a
    nested list of scalars (floats or 0-dim tensors, with ``exp`` / ``abs`` by type)."""
    exp = torch.exp if torch.is_tensor(logp[0][0]) else math.exp
    n = len(mask)
    sums, lens = [], []
    for i in range(n):
        toks = [t for t in range(len(mask[i])) if mask[i][t] > 0]
        total = 0.0
        for t in toks:
            lr = clamp(logp[i][t] - old[i][t], -20, 20) if not torch.is_tensor(logp[i][t]) else \
                (logp[i][t] - old[i][t]).clamp(-20, 20)
            r, a = exp(lr), adv[i][t]
            if clip:
                loss = max(-a * r, -a * min(max(r, 1 - EPS), 1 + EPS))  # -min(r A, clip(r) A)
            else:
                loss = -a * r
            if penalty is not None:
                loss = loss + penalty(i, t, lr)
            if step_keep is not None and not step_keep[i][t]:
                loss = 0.0 * loss
            total = total + weight[i][t] * loss
        sums.append(total)
        lens.append(len(toks))
    if agg == "token_mean":
        denom = sum(lens) if normalizer is None else normalizer
        return sum(sums) / max(denom, 1)
    denom = n if normalizer is None else normalizer  # seq_mean_token_mean
    return sum(s / max(k, 1) for s, k in zip(sums, lens)) / denom


def ref_value_and_grad(b, mask, weight, agg, **kw):
    lists = [b[k].tolist() for k in ("old", "adv")]
    m = mask.tolist()
    value = ref_policy_loss(b["logp"].tolist(), *lists, m, weight, agg, **kw)
    leaf = b["logp"].clone().requires_grad_(True)
    scal = [[leaf[i, t] for t in range(leaf.shape[1])] for i in range(leaf.shape[0])]
    loss = ref_policy_loss(scal, *lists, m, weight, agg, **kw)
    if not torch.is_tensor(loss):
        return value, torch.zeros_like(b["logp"])
    (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return value, torch.zeros_like(b["logp"]) if g is None else g


def run_objective(obj, b, mask=None, weight=None, sampler=True, normalizer=None, generator=None, old=None):
    x = b["logp"].clone().requires_grad_(True)
    loss, metrics = obj(x, b["old"] if old is None else old, b["adv"], b["mask"] if mask is None else mask,
                        sampler_logp=b["mu"] if sampler else None, behaviour_weight=weight,
                        normalizer=normalizer, generator=generator)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g, metrics


# --- corrections against the loop reference --------------------------------------------------

CORRECTION_CASES = [
    ("tis", dict(cap=1.3, level="token")),
    ("tis", dict(cap=1.5, level="sequence")),
    ("tis", dict(cap=1.1, level="geometric")),
    ("mis", dict(lo=0.8, hi=1.25, level="token")),
    ("mis", dict(lo=0.5, hi=2.0, level="sequence")),
    ("mis", dict(lo=0.9, hi=1.1, level="geometric")),
    ("decoupled", dict(cap=1.3, mode="mask", level="token")),
    ("decoupled", dict(cap=1.3, mode="truncate", level="token")),
    ("decoupled", dict(cap=1.05, mode="mask", level="geometric")),
    *[("rejection", dict(statistic=s, agg=a, lo=lo, hi=hi))
      for s, a in itertools.product(("k1", "k2", "k3"), ("token", "sum", "mean", "max"))
      for lo, hi in [((-0.1, 0.1) if s == "k1" else (None, 0.04))]],
    ("rejection", dict(statistic="k1", agg="sum", lo=-0.3, hi=None)),
]


@pytest.mark.parametrize("kind,params", CORRECTION_CASES, ids=[f"{k}-{'-'.join(map(str, p.values()))}" for k, p in CORRECTION_CASES])
def test_correction_weights_match_loop_reference(kind, params):
    seen_keep = seen_drop = 0
    for seed in range(3):
        b = make_batch(seed)
        corr = CORRECTIONS.build(kind, **params)
        w, keep, metrics = corr.weights(b["old"], b["mu"], b["mask"])
        rw, rk = ref_correction(kind, b["old"], b["mu"], b["mask"], **params)
        assert w.dtype == F64 and not w.requires_grad
        torch.testing.assert_close(w, torch.tensor(rw, dtype=F64), rtol=1e-12, atol=1e-14)
        assert keep.tolist() == rk
        valid = b["mask"] > 0
        seen_keep += int((keep & valid).sum())
        seen_drop += int((~keep & valid).sum()) + int((w[valid] < torch.exp(b["old"] - b["mu"])[valid] - 1e-12).sum())
        assert all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    assert seen_keep > 0 and seen_drop > 0  # the bounds bind: not a vacuous comparison


def ref_metrics(weight, keep, mask, above, below):
    """The correction/ metrics of one batch by loops."""
    toks = rows(mask)
    valid = [(i, t) for i, ts in enumerate(toks) for t in ts]
    ws = [weight[i][t] for i, t in valid]
    n = len(ws)
    seq_w = [sum(weight[i][t] for t in ts) / len(ts) for i, ts in enumerate(toks) if ts]
    ess = lambda v: sum(v) ** 2 / (len(v) * sum(x * x for x in v))  # noqa: E731
    nseq = len(seq_w)
    return {
        "weight_mean": sum(ws) / n, "weight_min": min(ws), "weight_max": max(ws),
        "ess_token": ess(ws), "ess_seq": ess(seq_w),
        "token_frac_high": sum(above[i][t] for i, t in valid) / n,
        "token_frac_low": sum(below[i][t] for i, t in valid) / n,
        "seq_frac_high": sum(any(above[i][t] for t in ts) for i, ts in enumerate(toks) if ts) / nseq,
        "seq_frac_low": sum(any(below[i][t] for t in ts) for i, ts in enumerate(toks) if ts) / nseq,
        "token_masked": sum(not keep[i][t] for i, t in valid) / n,
        "seq_masked": sum(any(not keep[i][t] for t in ts) for i, ts in enumerate(toks) if ts) / nseq,
    }


@pytest.mark.parametrize("kind,params", [("mis", dict(lo=0.8, hi=1.25, level="token")),
                                         ("tis", dict(cap=1.2, level="sequence"))])
def test_correction_metrics_match_loops(kind, params):
    b = make_batch(4)
    w, keep, m = CORRECTIONS.build(kind, **params).weights(b["old"], b["mu"], b["mask"])
    rw, rk = ref_correction(kind, b["old"], b["mu"], b["mask"], **params)
    toks = rows(b["mask"])
    x = (b["old"] - b["mu"]).tolist()
    lr = [ref_level_log_ratio({t: x[i][t] for t in ts}, ts, params["level"]) for i, ts in enumerate(toks)]
    hi = params.get("hi", params.get("cap"))
    lo = params.get("lo", 0.0)
    above = [[t in lr[i] and math.exp(lr[i][t]) > hi for t in range(b["mask"].shape[1])] for i in range(len(toks))]
    below = [[t in lr[i] and math.exp(lr[i][t]) < lo for t in range(b["mask"].shape[1])] for i in range(len(toks))]
    ref = ref_metrics(rw, rk, b["mask"], above, below)
    for k, v in ref.items():
        assert m[f"correction/{k}"].item() == pytest.approx(v, rel=1e-10, abs=1e-12), k
    assert 0 < ref["token_frac_high"] < 1 and m["correction/ess_token"].item() < 1
    k1 = sum(-x[i][t] for i, ts in enumerate(toks) for t in ts) / sum(map(len, toks))
    assert m["correction/kl_k1"].item() == pytest.approx(k1, rel=1e-10)


def test_ess_hand_computed():
    # weights [2, 0 | 1]: ESS = (3)^2 / (3 * 5) = 0.6; per sequence [1, 1] -> 1
    mask = torch.tensor([[1, 1], [1, 0]], dtype=F64)
    mu = torch.zeros(2, 2, dtype=F64)
    old = torch.tensor([[math.log(2), -50.0], [0.0, 0.0]], dtype=F64)
    w, keep, m = MaskedIS(lo=1e-3, hi=10).weights(old, mu, mask)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=F64))
    assert m["correction/ess_token"].item() == pytest.approx(0.6)
    assert m["correction/ess_seq"].item() == pytest.approx(1.0)
    assert m["correction/token_frac_low"].item() == pytest.approx(1 / 3)
    assert m["correction/seq_frac_low"].item() == pytest.approx(0.5)
    assert m["correction/token_masked"].item() == pytest.approx(1 / 3)


# --- corrections inside the objective: value and gradient ----------------------------------------

@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("kind,params", [("tis", dict(cap=1.3)), ("mis", dict(lo=0.8, hi=1.25)),
                                         ("mis", dict(lo=0.8, hi=1.25, renormalise=True)),
                                         ("decoupled", dict(cap=1.3)),
                                         ("rejection", dict(statistic="k3", agg="token", lo=None, hi=0.04))])
def test_corrected_objective_matches_loop_reference(kind, params, agg):
    """The weight multiplies the clipped per-token loss: loss = agg(w_t * max(-A r, -A clip(r)))
    (verl rollout_corr, TRL vLLM IS); a renormalising component also shrinks the normaliser."""
    for seed in range(2):
        b = make_batch(seed)
        obj = PolicyObjective("token", PPOClip(EPS), agg, correction=CORRECTIONS.build(kind, **params))
        rw = obj.rollout_weights(b["mask"], old_logp=b["old"], sampler_logp=b["mu"], advantages=b["adv"])
        loss, grad, _ = run_objective(obj, b, mask=rw.mask, weight=rw.weight)
        ref_w, ref_keep = ref_correction(kind, b["old"], b["mu"], b["mask"],
                                         **{k: v for k, v in params.items() if k != "renormalise"})
        renorm = obj.correction.renormalise
        ref_mask = torch.tensor([[1.0 if (b["mask"][i, t] > 0 and (ref_keep[i][t] or not renorm)) else 0.0
                                  for t in range(b["mask"].shape[1])] for i in range(b["mask"].shape[0])], dtype=F64)
        torch.testing.assert_close(rw.mask, ref_mask)
        value, ref_grad = ref_value_and_grad(b, ref_mask, ref_w, agg)
        assert loss.item() == pytest.approx(value, rel=1e-10, abs=1e-13)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


# --- identities --------------------------------------------------------------------------------

@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_identities(agg):
    b = make_batch(5)
    plain = PolicyObjective("token", PPOClip(EPS), agg)
    base_loss, base_grad, _ = run_objective(plain, b, sampler=False)
    same = dict(b, mu=b["old"].clone())  # mu == pi_old

    # TIS with C = inf and mu == pi_old equals no correction
    tis = PolicyObjective("token", PPOClip(EPS), agg, correction=TruncatedIS(cap=math.inf))
    rw = tis.rollout_weights(same["mask"], old_logp=same["old"], sampler_logp=same["mu"])
    loss, grad, _ = run_objective(tis, same, mask=rw.mask, weight=rw.weight)
    torch.testing.assert_close(loss, base_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, base_grad, rtol=1e-14, atol=0)

    # MIS with bounds [0, inf] equals TIS with C = inf (mu != pi_old)
    w_mis, keep_mis, _ = MaskedIS(lo=0.0, hi=math.inf).weights(b["old"], b["mu"], b["mask"])
    w_tis, keep_tis, _ = TruncatedIS(cap=math.inf).weights(b["old"], b["mu"], b["mask"])
    torch.testing.assert_close(w_mis, w_tis, rtol=0, atol=0)
    assert torch.equal(keep_mis, keep_tis)

    # bypass with mu == pi_old equals the standard objective (and needs no old_logp)
    byp = PolicyObjective("token", PPOClip(EPS), agg, correction="bypass")
    assert byp.correction.replaces_old_logp and not byp.needs_old_logp_pass
    rw = byp.rollout_weights(same["mask"], sampler_logp=same["mu"])
    x = same["logp"].clone().requires_grad_(True)
    loss, _ = byp(x, None, same["adv"], rw.mask, sampler_logp=same["mu"], behaviour_weight=rw.weight)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss.detach(), base_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, base_grad, rtol=1e-14, atol=0)
    # ... and with mu != pi_old it is the standard objective with pi_old := mu
    loss_mu, grad_mu, _ = run_objective(plain, b, sampler=False, old=b["mu"])
    loss, grad, _ = run_objective(byp, b)  # old_logp given, but ignored in favour of mu
    torch.testing.assert_close(loss, loss_mu, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, grad_mu, rtol=1e-14, atol=0)

    # the entropy mask at quantile 0 (rho = 1) equals no mask
    ent = PolicyObjective("token", PPOClip(EPS), agg, masks={"high_entropy": HighEntropyMask(rho=1.0)})
    rw = ent.rollout_weights(b["mask"], old_logp=b["old"], advantages=b["adv"], entropy=b["ent"])
    torch.testing.assert_close(rw.mask, b["mask"])
    assert rw.metrics["mask/high_entropy_frac"].item() == 0.0
    loss, grad, _ = run_objective(ent, b, mask=rw.mask, weight=rw.weight, sampler=False)
    torch.testing.assert_close(loss, base_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, base_grad, rtol=1e-14, atol=0)


def test_no_correction_and_no_masks_change_nothing():
    b = make_batch(6)
    obj = PolicyObjective("sequence", PPOClip(0.05), "seq_mean_token_mean")
    assert not obj.has_rollout_weights and not obj.needs_sampler_logp and not obj.needs_old_logp_pass
    base, g0, m0 = run_objective(obj, b, sampler=False)
    rw = obj.rollout_weights(b["mask"], old_logp=b["old"], sampler_logp=b["mu"])
    assert torch.equal(rw.mask, b["mask"]) and torch.equal(rw.weight, b["mask"])
    assert "correction/kl_k3" in rw.metrics  # the mismatch is still reported
    loss, g, m = run_objective(obj, b, mask=rw.mask, weight=rw.weight)
    torch.testing.assert_close(loss, base, rtol=0, atol=0)
    torch.testing.assert_close(g, g0, rtol=0, atol=0)


# --- masks: per rollout --------------------------------------------------------------------------

def ref_quantile(values, q):
    """Linear interpolation between order statistics (torch.quantile's default), by hand."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ref_high_entropy(ent, mask, rho):
    """80/20 rule (arXiv 2506.01939): keep H_t >= quantile_{1-rho} of the batch's valid tokens."""
    toks = rows(mask)
    vals = [ent[i][t] for i, ts in enumerate(toks) for t in ts]
    thr = ref_quantile(vals, 1 - rho)
    return [[t in toks[i] and ent[i][t] >= thr for t in range(len(ent[i]))] for i in range(len(ent))]


def ref_m2po(old, mu, mask, tau):
    """M2PO (arXiv 2510.01161): drop the largest (log pi_old - log mu)^2 until the rest's mean < tau."""
    toks = rows(mask)
    m2 = {(i, t): (old[i][t] - mu[i][t]) ** 2 for i, ts in enumerate(toks) for t in ts}
    s = sorted(m2.values(), reverse=True)
    k = len(s)
    for j in range(len(s)):
        if sum(s[j:]) / (len(s) - j) < tau:
            k = j
            break
    cut = s[k - 1] if k > 0 else math.inf
    return [[(i, t) in m2 and m2[(i, t)] < cut for t in range(len(old[i]))] for i in range(len(old))]


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.93])
def test_high_entropy_mask_matches_loops(rho):
    b = make_batch(7)
    keep, metrics, pen = HighEntropyMask(rho=rho)(MaskInputs(mask=b["mask"], entropy=b["ent"], advantages=b["adv"]))
    assert pen is None
    assert keep.tolist() == ref_high_entropy(b["ent"].tolist(), b["mask"], rho)
    n = b["mask"].sum().item()
    assert metrics["mask/high_entropy_frac"].item() == pytest.approx(1 - keep.sum().item() / n)
    valid = b["mask"] > 0
    pos = valid & (b["adv"] > 0)
    assert metrics["mask/high_entropy_frac_pos"].item() == pytest.approx(((~keep) & pos).sum().item() / pos.sum().item())


@pytest.mark.parametrize("tau", [1e-3, 0.02, 0.08, 10.0])
def test_m2po_mask_matches_loops(tau):
    b = make_batch(8)
    keep, metrics, _ = M2POMask(tau=tau)(MaskInputs(mask=b["mask"], old_logp=b["old"], sampler_logp=b["mu"],
                                                    advantages=b["adv"]))
    assert keep.tolist() == ref_m2po(b["old"].tolist(), b["mu"].tolist(), b["mask"], tau)
    kept = ((b["old"] - b["mu"]) ** 2)[keep]
    if kept.numel():
        assert kept.mean().item() < tau  # the kept second moment is under tau
    assert metrics["mask/m2po_m2_after"].item() < tau or kept.numel() == 0


def test_truncated_mask_and_its_normaliser():
    b = make_batch(9)
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean", masks=["truncated"])
    assert obj.needs_truncated and obj.masks["truncated"].renormalise
    rw = obj.rollout_weights(b["mask"], advantages=b["adv"], truncated=b["truncated"])
    expect = b["mask"] * (~b["truncated"]).to(F64)[:, None]
    torch.testing.assert_close(rw.mask, expect)  # dropped completions leave the loss mask
    assert b["truncated"].any() and (~b["truncated"]).any()
    loss, grad, _ = run_objective(obj, b, mask=rw.mask, weight=rw.weight, sampler=False)
    value, ref_grad = ref_value_and_grad(b, expect, [[1.0] * 7 for _ in range(6)], "token_mean")
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


def test_non_renormalising_mask_keeps_the_normaliser():
    # high_entropy (renormalise False): the dropped tokens count in the normaliser with weight 0
    b = make_batch(10)
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean", masks={"high_entropy": HighEntropyMask(0.5)})
    rw = obj.rollout_weights(b["mask"], entropy=b["ent"], advantages=b["adv"])
    torch.testing.assert_close(rw.mask, b["mask"])
    keep = ref_high_entropy(b["ent"].tolist(), b["mask"], 0.5)
    w = [[1.0 if keep[i][t] else 0.0 for t in range(7)] for i in range(6)]
    torch.testing.assert_close(rw.weight, torch.tensor(w, dtype=F64) * b["mask"])
    loss, grad, _ = run_objective(obj, b, mask=rw.mask, weight=rw.weight, sampler=False)
    value, ref_grad = ref_value_and_grad(b, b["mask"], w, "token_mean")
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


def _two_rank_gather(mask_fn, halves):
    """Simulate two ranks: record each rank's local values (identity gather), then give each rank
    a gather returning the concatenation in rank order, as an all-gather would."""
    local = []
    for h in halves:
        def record(x):
            local.append(x.clone())
            return x
        mask_fn(h, record)
    outs = []
    for r, h in enumerate(halves):
        def gather(x, r=r):
            assert torch.equal(x, local[r])
            return torch.cat([x if j == r else local[j] for j in range(len(halves))])
        outs.append(mask_fn(h, gather))
    return outs


@pytest.mark.parametrize("which", ["high_entropy", "m2po"])
def test_two_rank_gather_equals_single_batch(which):
    b = make_batch(11, n=8)
    mk = HighEntropyMask(rho=0.3) if which == "high_entropy" else M2POMask(tau=0.03)

    def run(rows_, gather):
        return mk(MaskInputs(mask=b["mask"][rows_], entropy=b["ent"][rows_], old_logp=b["old"][rows_],
                             sampler_logp=b["mu"][rows_], advantages=b["adv"][rows_], gather=gather)).keep

    full = run(slice(None), None)
    halves = [torch.tensor([0, 2, 3, 7]), torch.tensor([1, 4, 5, 6])]  # uneven token counts
    keeps = _two_rank_gather(run, halves)
    for h, k in zip(halves, keeps):
        assert torch.equal(k, full[h])
    # and each rank alone (no gather) would decide differently: the gather matters
    alone = [run(h, None) for h in halves]
    assert any(not torch.equal(a, full[h]) for a, h in zip(alone, halves))


# --- masks: per minibatch (need pi_theta) ----------------------------------------------------------

def ref_cov(logp, adv, mask):
    toks = rows(mask)
    valid = [(i, t) for i, ts in enumerate(toks) for t in ts]
    ma = sum(adv[i][t] for i, t in valid) / len(valid)
    ml = sum(logp[i][t] for i, t in valid) / len(valid)
    return {(i, t): (adv[i][t] - ma) * (logp[i][t] - ml) for i, t in valid}  # arXiv 2505.22617 eq. 6


def test_kl_cov_matches_loops():
    """KL-Cov (arXiv 2505.22617): -A r on every token (no clip) + coef |log r| on the top-k cov tokens."""
    ratio, coef = 0.1, 0.7
    for seed in range(2):
        b = make_batch(12 + seed)
        obj = PolicyObjective("token", NoClip(), "token_mean", masks={"kl_cov": KLCovPenalty(ratio=ratio, coef=coef)})
        loss, grad, metrics = run_objective(obj, b, sampler=False)
        cov = ref_cov(b["logp"].tolist(), b["adv"].tolist(), b["mask"])
        k = max(1, int(len(cov) * ratio))
        top = set(sorted(cov, key=cov.get, reverse=True)[:k])
        abs_ = lambda v: v.abs() if torch.is_tensor(v) else abs(v)  # noqa: E731
        pen = lambda i, t, lr: coef * abs_(lr) if (i, t) in top else 0.0  # noqa: E731
        ones = [[1.0] * 7 for _ in range(6)]
        value, ref_grad = ref_value_and_grad(b, b["mask"], ones, "token_mean", clip=False, penalty=pen)
        assert loss.item() == pytest.approx(value, rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
        assert metrics["mask/kl_cov_frac"].item() == pytest.approx(k / len(cov))


def test_clip_cov_matches_loops():
    """Clip-Cov (arXiv 2505.22617; the authors' verl code): among valid tokens with lb < cov < ub
    that the clip did not clip, detach max(int(ratio n), 1) chosen by a seeded randperm."""
    ratio, lb, ub = 0.1, -0.5, 0.5
    b = make_batch(14)
    mk = ClipCovMask(ratio=ratio, lb=lb, ub=ub)
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean", masks={"clip_cov": mk})
    loss, grad, metrics = run_objective(obj, b, sampler=False, generator=torch.Generator().manual_seed(3))
    cov = ref_cov(b["logp"].tolist(), b["adv"].tolist(), b["mask"])
    lp, old, adv = b["logp"].tolist(), b["old"].tolist(), b["adv"].tolist()
    clipped = {(i, t) for (i, t) in cov
               if (adv[i][t] > 0 and math.exp(lp[i][t] - old[i][t]) > 1 + EPS)
               or (adv[i][t] < 0 and math.exp(lp[i][t] - old[i][t]) < 1 - EPS)}
    cand = [(i, t) for i in range(6) for t in range(7) if (i, t) in cov and lb < cov[(i, t)] < ub and (i, t) not in clipped]
    num = min(max(int(ratio * len(cov)), 1), len(cand))
    perm = torch.randperm(len(cand), generator=torch.Generator().manual_seed(3))[:num].tolist()
    dropped = {cand[j] for j in perm}
    assert 0 < len(dropped) < len(cand)
    step_keep = [[(i, t) not in dropped for t in range(7)] for i in range(6)]
    value, ref_grad = ref_value_and_grad(b, b["mask"], [[1.0] * 7 for _ in range(6)], "token_mean",
                                         step_keep=step_keep)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    assert metrics["mask/clip_cov_frac"].item() == pytest.approx(num / len(cov))
    # without a generator the mask's own seeded one is used: reproducible from the seed
    r1 = ClipCovMask(ratio=ratio, lb=lb, ub=ub, seed=5)(MaskInputs(mask=b["mask"], logp=b["logp"], advantages=b["adv"]))
    r2 = ClipCovMask(ratio=ratio, lb=lb, ub=ub, seed=5)(MaskInputs(mask=b["mask"], logp=b["logp"], advantages=b["adv"]))
    assert torch.equal(r1.keep, r2.keep)


@pytest.mark.parametrize("use_sampler", [True, False])
def test_opsm_matches_loops(use_sampler):
    """OPSM (arXiv 2512.02556 eq. 9): drop sequence i if A_i < 0 and mean_t(log mu - log pi_theta) > delta;
    mu falls back to pi_old without sampler log-probs (TRL). The normaliser is unchanged."""
    delta = 0.02
    b = make_batch(15, spread=0.3)
    b["mu"] = b["old"] + 0.1 * torch.randn(b["old"].shape, generator=torch.Generator().manual_seed(1), dtype=F64) * b["mask"]
    obj = PolicyObjective("token", PPOClip(EPS), "seq_mean_token_mean", masks=["opsm"])
    obj.masks["opsm"].delta = delta
    loss, grad, metrics = run_objective(obj, b, sampler=use_sampler)
    ref = (b["mu"] if use_sampler else b["old"]).tolist()
    lp, adv = b["logp"].tolist(), b["adv"].tolist()
    dropped = set()
    for i, ts in enumerate(rows(b["mask"])):
        kl = sum(ref[i][t] - lp[i][t] for t in ts) / len(ts)
        a = sum(adv[i][t] for t in ts) / len(ts)
        if a < 0 and kl > delta:
            dropped.add(i)
    assert dropped and len(dropped) < 6
    step_keep = [[i not in dropped for _ in range(7)] for i in range(6)]
    value, ref_grad = ref_value_and_grad(b, b["mask"], [[1.0] * 7 for _ in range(6)], "seq_mean_token_mean",
                                         step_keep=step_keep)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    assert metrics["mask/opsm_frac_pos"].item() == 0.0  # only negative-advantage sequences go


# --- every component keeps loss and gradient finite when it removes every token -------------------

def _remove_all(b):
    n = b["mask"].shape[0]
    allneg = dict(b, adv=-(b["adv"].abs() + 0.5) * b["mask"], mu=b["logp"] + 1.0)
    return [
        ("truncated", {"masks": ["truncated"]}, dict(b, truncated=torch.ones(n, dtype=torch.bool))),
        ("m2po", {"masks": {"m2po": M2POMask(tau=1e-12)}}, b),
        ("opsm", {"masks": ["opsm"]}, allneg),
        ("clip_cov", {"masks": {"clip_cov": ClipCovMask(ratio=1.0, lb=-1e9, ub=1e9)}, "clip": NoClip()}, b),
        ("mis", {"correction": MaskedIS(lo=10.0, hi=20.0)}, b),
        ("mis_renorm", {"correction": MaskedIS(lo=10.0, hi=20.0, renormalise=True)}, b),
        ("rejection", {"correction": RejectionSampling(statistic="k2", agg="max", lo=None, hi=0.0)}, b),
        ("decoupled", {"correction": DecoupledPPO(cap=1.0 + 1e-9)}, dict(b, mu=b["old"] - 1.0)),
        ("high_entropy_empty", {"masks": ["high_entropy"]}, dict(b, mask=torch.zeros_like(b["mask"]))),
        ("kl_cov_empty", {"masks": ["kl_cov"], "clip": NoClip()}, dict(b, mask=torch.zeros_like(b["mask"]))),
    ]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_every_component_keeps_loss_finite_when_it_removes_every_token(agg):
    for name, kw, b in _remove_all(make_batch(16)):
        b = dict(b)
        garbage = b["mask"] == 0
        b["logp"], b["old"] = b["logp"].clone(), b["old"].clone()
        b["logp"][garbage], b["old"][garbage] = float("nan"), float("inf")  # padding may hold anything
        obj = PolicyObjective("token", kw.get("clip", PPOClip(EPS)), agg, kl="k3+", kl_coef=0.0,
                              correction=kw.get("correction"), masks=kw.get("masks"))
        rw = obj.rollout_weights(b["mask"], old_logp=b["old"], sampler_logp=b["mu"], advantages=b["adv"],
                                 entropy=b["ent"], truncated=b["truncated"])
        if name not in ("opsm", "clip_cov"):  # per-rollout components: the weight is zero everywhere
            assert (rw.weight == 0).all(), name
        loss, grad, metrics = run_objective(obj, b, mask=rw.mask, weight=rw.weight)
        assert torch.isfinite(loss) and loss.item() == 0.0, name
        assert torch.isfinite(grad).all() and (grad == 0).all(), name
        assert all(torch.isfinite(v) for v in {**metrics, **rw.metrics}.values()), name


# --- padding, dtypes, validation -----------------------------------------------------------------

@pytest.mark.parametrize("kind,params", [("tis", dict(cap=1.3, level="sequence")), ("mis", dict(lo=0.8, hi=1.3)),
                                         ("rejection", dict(statistic="k3", agg="max", lo=None, hi=0.05)),
                                         ("decoupled", dict(cap=1.2))])
def test_padding_garbage_changes_nothing(kind, params):
    b = make_batch(17)
    corr = CORRECTIONS.build(kind, **params)
    w0, k0, m0 = corr.weights(b["old"], b["mu"], b["mask"])
    pad = b["mask"] == 0
    for v in (float("nan"), float("inf"), -float("inf"), 1e30):
        old, mu = b["old"].clone(), b["mu"].clone()
        old[pad], mu[pad] = v, -v
        w, k, m = corr.weights(old, mu, b["mask"])
        assert torch.equal(w, w0) and torch.equal(k, k0) and (w[pad] == 0).all() and not k[pad].any()
        for key in m0:
            torch.testing.assert_close(m[key], m0[key], msg=key)


def test_float64_stays_float64_and_float32_works():
    b = make_batch(18)
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean", correction="tis", masks=["m2po"])
    rw = obj.rollout_weights(b["mask"], old_logp=b["old"], sampler_logp=b["mu"], advantages=b["adv"])
    assert rw.weight.dtype == F64 and rw.mask.dtype == F64
    f32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in b.items()}
    rw32 = obj.rollout_weights(f32["mask"], old_logp=f32["old"], sampler_logp=f32["mu"], advantages=f32["adv"])
    assert rw32.weight.dtype == torch.float32
    torch.testing.assert_close(rw32.weight, rw.weight.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,param", [
    (lambda: TruncatedIS(cap=0.0), "cap"),
    (lambda: TruncatedIS(level="tokens"), "level"),
    (lambda: MaskedIS(lo=-0.1), "lo"),
    (lambda: MaskedIS(lo=2.0, hi=1.0), "hi"),
    (lambda: RejectionSampling(statistic="k4"), "statistic"),
    (lambda: RejectionSampling(agg="median"), "agg"),
    (lambda: RejectionSampling(lo=None, hi=None), "bound"),
    (lambda: DecoupledPPO(cap=0.9), "cap"),
    (lambda: DecoupledPPO(mode="clip"), "mode"),
    (lambda: HighEntropyMask(rho=0.0), "rho"),
    (lambda: HighEntropyMask(rho=1.5), "rho"),
    (lambda: M2POMask(tau=0.0), "tau"),
    (lambda: ClipCovMask(lb=2.0, ub=1.0), "ub"),
    (lambda: KLCovPenalty(ratio=0.0), "ratio"),
    (lambda: KLCovPenalty(coef=-1.0), "coef"),
    (lambda: OPSMMask(delta="x"), "delta"),
])
def test_bad_parameters_name_the_parameter(make, param):
    with pytest.raises(ValueError, match=param):
        make()


def test_missing_inputs_name_the_input():
    b = make_batch(19)
    with pytest.raises(ValueError, match="sampler_logp"):
        TruncatedIS().weights(b["old"], None, b["mask"])
    with pytest.raises(ValueError, match="sampler_logp"):
        Bypass().weights(None, None, b["mask"])
    with pytest.raises(ValueError, match="entropy"):
        HighEntropyMask()(MaskInputs(mask=b["mask"]))
    with pytest.raises(ValueError, match="truncated"):
        TruncatedMask()(MaskInputs(mask=b["mask"]))
    with pytest.raises(ValueError, match="old_logp"):
        PolicyObjective()(b["logp"], None, b["adv"], b["mask"])
    with pytest.raises(ValueError, match="valid choices"):
        PolicyObjective(correction="bogus")
    with pytest.raises(ValueError, match="valid choices"):
        PolicyObjective(masks=["bogus"])
    assert set(CORRECTIONS.names()) == {"none", "tis", "mis", "rejection", "bypass", "decoupled"}
    assert set(MASKS.names()) == {"truncated", "high_entropy", "clip_cov", "kl_cov", "opsm", "m2po"}


# --- KL options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("detached", [False, True])
def test_importance_corrected_kl_matches_loops(detached):
    """DeepSeek-V3.2 (arXiv 2512.02556 §3.1): KL_t = (pi_theta/pi_old) * k3_t, the ratio not detached
    (TRL use_bias_correction_kl, slime --use-unbiased-kl); detached on request."""
    b = make_batch(20)
    ref = b["old"] + 0.2
    beta = 0.1
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean", kl="k3", kl_coef=beta,
                          kl_is_corrected=True, kl_is_detached=detached)
    x = b["logp"].clone().requires_grad_(True)
    loss, m = obj(x, b["old"], b["adv"], b["mask"], ref_logp=ref)
    (grad,) = torch.autograd.grad(loss, x)
    plain = PolicyObjective("token", PPOClip(EPS), "token_mean")
    ploss, pgrad, _ = run_objective(plain, b, sampler=False)

    def kl_ref(lp):  # loops over the valid tokens
        total, n = 0.0, 0
        for i, ts in enumerate(rows(b["mask"])):
            for t in ts:
                r = torch.exp(lp[i, t] - b["old"][i, t])
                r = r.detach() if detached else r
                d = ref[i, t] - lp[i, t]
                total = total + r * (torch.exp(d) - d - 1)
                n += 1
        return total / n

    leaf = b["logp"].clone().requires_grad_(True)
    k = kl_ref(leaf)
    (kgrad,) = torch.autograd.grad(k, leaf)
    assert loss.item() == pytest.approx(ploss.item() + beta * k.item(), rel=1e-12)
    torch.testing.assert_close(grad, pgrad + beta * kgrad, rtol=1e-10, atol=1e-13)


def test_k3_plus_is_k3_value_with_k2_gradient():
    b = make_batch(21)
    ref = b["old"] + 0.3 * b["mask"]
    x = b["logp"].clone().requires_grad_(True)
    v = kl_k3_plus(x, ref)
    d = (ref - b["logp"])
    torch.testing.assert_close(v.detach(), torch.expm1(d) - d, rtol=1e-12, atol=1e-15)  # the k3 value
    (g,) = torch.autograd.grad((v * b["mask"]).sum(), x)
    torch.testing.assert_close(g, (b["logp"] - ref) * b["mask"], rtol=1e-12, atol=1e-15)  # grad of (ref - logp)^2 / 2
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean", kl="k3+", kl_coef=0.5)
    obj3 = PolicyObjective("token", PPOClip(EPS), "token_mean", kl="k3", kl_coef=0.5)
    l_plus, m_plus = obj(x, b["old"], b["adv"], b["mask"], ref_logp=ref)
    l3, m3 = obj3(x, b["old"], b["adv"], b["mask"], ref_logp=ref)
    torch.testing.assert_close(l_plus, l3)  # same value, different gradient
    assert obj.needs_reference and obj.kl_name == "k3+"


# --- the per-rollout design: minibatches stay exact --------------------------------------------------

def test_minibatches_with_rollout_weights_equal_the_full_batch():
    b = make_batch(22, n=8)
    obj = PolicyObjective("token", PPOClip(EPS), "token_mean",
                          correction=RejectionSampling(statistic="k2", agg="token", lo=None, hi=0.03),
                          masks={"high_entropy": HighEntropyMask(0.6), "truncated": TruncatedMask(),
                                 "m2po": M2POMask(0.05)})
    rw = obj.rollout_weights(b["mask"], old_logp=b["old"], sampler_logp=b["mu"], advantages=b["adv"],
                             entropy=b["ent"], truncated=b["truncated"])
    assert 0 < rw.mask.sum() < b["mask"].sum() and ((rw.weight == 0) & (rw.mask > 0)).any()
    for key in ("correction/ess_token", "mask/high_entropy_frac", "mask/truncated_frac", "mask/m2po_frac"):
        assert key in rw.metrics
    x = b["logp"].clone().requires_grad_(True)
    full, _ = obj(x, b["old"], b["adv"], rw.mask, sampler_logp=b["mu"], behaviour_weight=rw.weight)
    (g_full,) = torch.autograd.grad(full, x)
    splits = [slice(0, 3), slice(3, 8)]
    normalizer = sum(obj.aggregation.count(rw.mask[s]) for s in splits)  # counted after masking
    x = b["logp"].clone().requires_grad_(True)
    total = sum(obj(x[s], b["old"][s], b["adv"][s], rw.mask[s], sampler_logp=b["mu"][s],
                    behaviour_weight=rw.weight[s], normalizer=normalizer)[0] for s in splits)
    (g_split,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(total.detach(), full.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_split, g_full, rtol=1e-12, atol=1e-14)


def test_objective_flags_for_the_training_loop():
    o = PolicyObjective(correction="tis", masks=["high_entropy", "opsm", "truncated"])
    assert o.needs_sampler_logp and o.needs_old_logp_pass and o.needs_rollout_entropy and o.needs_truncated
    assert set(o.rollout_masks) == {"high_entropy", "truncated"} and set(o.step_masks) == {"opsm"}
    o = PolicyObjective(correction="bypass", masks=["clip_cov"])
    assert o.needs_sampler_logp and not o.needs_old_logp_pass and not o.needs_rollout_entropy
    o = PolicyObjective(masks=["m2po"])
    assert o.needs_sampler_logp and o.needs_old_logp_pass and o.has_rollout_weights


# --- presets ---------------------------------------------------------------------------------------

def test_behaviour_presets_have_their_sources_settings():
    spec = {n: preset_spec(n) for n in ("grpo_tis", "grpo_mis", "gspo_seq_mis", "icepop", "entropy_80_20",
                                        "clip_cov", "kl_cov", "opsm", "m2po", "decoupled_ppo")}
    assert spec["grpo_tis"]["correction"] == {"name": "tis", "cap": 2.0, "level": "token"}
    assert spec["grpo_mis"]["correction"]["hi"] == 3.0 and spec["grpo_mis"]["correction"]["level"] == "token"
    assert spec["gspo_seq_mis"]["correction"]["level"] == "sequence" and spec["gspo_seq_mis"]["ratio"]["name"] == "sequence"
    assert (spec["icepop"]["correction"]["lo"], spec["icepop"]["correction"]["hi"]) == (0.5, 5.0)
    assert spec["entropy_80_20"]["masks"]["high_entropy"]["rho"] == 0.2 and spec["entropy_80_20"]["clip"]["eps_high"] == 0.28
    assert spec["clip_cov"]["masks"]["clip_cov"] == {"name": "clip_cov", "ratio": 2e-4, "lb": 1.0, "ub": 5.0, "seed": 0}
    assert spec["kl_cov"]["masks"]["kl_cov"]["ratio"] == 2e-3 and spec["kl_cov"]["clip"]["name"] == "none"
    assert spec["opsm"]["masks"]["opsm"]["delta"] == 1e-4
    assert spec["m2po"]["masks"]["m2po"]["tau"] == 0.04 and spec["m2po"]["correction"]["cap"] == 5.0
    assert spec["decoupled_ppo"]["correction"] == {"name": "decoupled", "cap": 5.0, "mode": "mask", "level": "token"}
    for name in spec:
        _, obj = build_preset(name)
        assert obj.has_rollout_weights or obj.step_masks, name
    _, obj = build_preset("dapo", masks={"opsm": {"name": "opsm", "delta": 0.5}})
    assert isinstance(obj.correction, NoCorrection) and obj.masks["opsm"].delta == 0.5
    _, obj = build_preset("entropy_80_20", masks={"high_entropy": None})
    assert obj.masks == {}
