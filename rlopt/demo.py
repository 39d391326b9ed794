"""Print the seed document's worked GRPO and GSPO examples, computed by the library.

    rlopt-demo                  # or: python -m rlopt.demo

Each step shows the library's value next to the number the seed document
(000_f848886115f8dc72.txt) printed. The seed rounds to 2-3 decimals and has one arithmetic
erratum: GRPO token 4 (w = 0.875 lies inside [0.8, 1.2], so it is not clipped; its
coefficient is 0.875 * 7.2 = 6.3, not 5.76), flagged as ERRATUM below. Everything runs in
float64 on the CPU in well under a second.
"""

from __future__ import annotations

import math

import torch

from rlopt.algorithms import (
    GroupBaseline, PolicyObjective, PPOClip, SequenceRatio, TokenRatio, build_preset,
)

F64 = torch.float64


def _row(label: str, ours: list[float], seed: list[float] | None, flags: list[str] | None = None) -> None:
    print(f"  {label}")
    for i, v in enumerate(ours):
        s = "" if seed is None else f"   seed: {seed[i]:g}"
        f = "" if not flags or not flags[i] else f"   {flags[i]}"
        print(f"    [{i + 1}] {v + 0.0:10.6f}{s}{f}")  # + 0.0: no "-0.000000"


def grpo() -> None:
    print("GRPO (seed version): discounted return, token ratio, clipped weight (eps 0.2)")
    est, obj = build_preset("discounted_weight_clip")
    mask = torch.ones(1, 5, dtype=F64)
    returns = est(torch.tensor([8.0], dtype=F64), mask)  # terminal reward 8, gamma 0.9
    _row("step 1  G_t = 0.9^(5-t) * 8", returns[0].tolist(), [5.25, 5.83, 6.48, 7.2, 8.0])
    pi_old = torch.tensor([[0.3, 0.2, 0.15, 0.8, 0.4]], dtype=F64)
    pi_new = torch.tensor([[0.4, 0.25, 0.18, 0.7, 0.6]], dtype=F64)
    logp, old = pi_new.log().requires_grad_(True), pi_old.log()
    ratio, log_ratio = TokenRatio()(logp, old, mask)
    _row("step 2  w_t = pi_new / pi_old", ratio[0].tolist(), [1.33, 1.25, 1.2, 0.875, 1.5])
    clipped = ratio.clamp(0.8, 1.2)[0].tolist()
    erratum = ["", "", "", "ERRATUM: 0.875 is inside [0.8, 1.2]; the seed clips it to 0.8", ""]
    _row("step 3a clip(w_t, 0.8, 1.2)", clipped, [1.2, 1.2, 1.2, 0.8, 1.2], erratum)
    loss, _ = obj(logp, old, returns, mask)  # -sum_t sg(clip(w_t)) G_t log w_t
    (grad,) = torch.autograd.grad(loss, logp)
    erratum[3] = "ERRATUM: 0.875 * 7.2 = 6.3; the seed prints 0.8 * 7.2 = 5.76"
    _row("step 3b coefficient on grad log pi = clip(w_t) * G_t = -d loss/d logp_t",
         (-grad[0]).tolist(), [6.3, 7.0, 7.78, 5.76, 9.6], erratum)
    print("  papers' PPO clip instead: -min(w A, clip(w) A), A_t = G_t")
    logp2 = logp.detach().clone().requires_grad_(True)
    loss, m = PolicyObjective("token", PPOClip(0.2), "seq_mean_token_sum")(logp2, old, returns, mask)
    (grad,) = torch.autograd.grad(loss, logp2)
    note = ["clipped: zero gradient" if w > 1.2 + 1e-9 else "" for w in ratio[0].tolist()]
    _row("coefficient = w_t * A_t where unclipped, 0 where w_t > 1.2", (-grad[0]).tolist(), None, note)
    print(f"  clip/token_high = {m['clip/token_high'].item():.2f}")


def gspo() -> None:
    print("GSPO (seed version): group contrast, sequence ratio, no clip")
    lengths, p_old, p_new = [7, 5, 3], [1e-9, 1e-7, 1e-5], [2e-9, 1.5e-7, 8e-6]
    rewards = torch.tensor([9.0, 8.0, 5.0], dtype=F64)
    g = torch.tensor([5.0, 3.0, 2.0], dtype=F64)  # the seed's given d log pi(y|x)
    logp = torch.zeros(3, 7, dtype=F64)
    old = torch.zeros(3, 7, dtype=F64)
    mask = torch.zeros(3, 7, dtype=F64)
    for i, n in enumerate(lengths):  # spread log P(y) evenly over the L tokens of each answer
        logp[i, :n], old[i, :n], mask[i, :n] = math.log(p_new[i]) / n, math.log(p_old[i]) / n, 1.0
    est, obj = build_preset("contrast_seq_ratio")
    adv = est(rewards, mask, group_size=3)
    print(f"  step 1  rewards 9, 8, 5 -> good = above the mean {rewards.mean().item():.3f}: A, B; bad: C")
    _row("        contrast advantages +1/|good|, -1/|bad|", adv[:, 0].tolist(), None)
    s = SequenceRatio()(logp, old, mask)[0][:, 0]
    _row("step 2  s(y) = (pi_new(y) / pi_old(y))^(1/|y|)", s.tolist(), [1.104, 1.084, 0.928])
    gap = (adv[:, 0] * s).sum().item()
    print(f"  step 3  mean_good s - mean_bad s = {gap:.6f}   seed: 0.166")
    theta = torch.zeros((), dtype=F64, requires_grad=True)  # d mean_t logp_i / d theta = g_i
    loss, _ = obj(logp + theta * g[:, None] * mask, old, adv, mask, normalizer=1.0)
    (grad,) = torch.autograd.grad(loss, theta)
    print(f"  step 4  sum_i A_i s_i g_i = {-grad.item():.6f}   seed: 2.53")
    print("papers' GSPO advantage (r - mean) / std instead of the contrast:")
    for std in ("unbiased", "population"):
        a = GroupBaseline(std=std, eps=0.0)(rewards, mask, group_size=3)[:, 0]
        print(f"  {std:>10} std: " + ", ".join(f"{v:.6f}" for v in a.tolist()))


def main() -> None:
    grpo()
    print()
    gspo()


if __name__ == "__main__":
    main()
