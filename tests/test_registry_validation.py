"""Registries, parameter validation, presets and the objective's metrics."""

import math
import os

import pytest
import torch

from rlopt.algorithms import (
    ADVANTAGES, AGGREGATIONS, CLIPPING, CORRECTIONS, KL_ESTIMATORS, RATIOS, DiscountedReturn,
    GroupBaseline, GroupContrast, PolicyObjective, PPOClip, SeqMeanTokenSumNorm, TokenRatio,
    WeightClip, build_preset, preset_names, preset_spec,
)

F64 = torch.float64
REGISTRIES = [ADVANTAGES, RATIOS, CLIPPING, AGGREGATIONS, KL_ESTIMATORS]


# --- registries -------------------------------------------------------------------------------

@pytest.mark.parametrize("reg", REGISTRIES, ids=lambda r: r.kind)
def test_unknown_name_lists_choices(reg):
    with pytest.raises(ValueError) as e:
        reg.get("no_such_thing")
    msg = str(e.value)
    assert "no_such_thing" in msg and reg.kind in msg
    for name in reg.names():
        assert name in msg
    with pytest.raises(ValueError, match="valid choices"):
        reg.build("no_such_thing")


def test_registry_contents():
    # the original components stay registered (additions never break this test)
    assert set(ADVANTAGES.names()) >= {"group_baseline", "group_contrast", "discounted_return"}
    assert set(RATIOS.names()) >= {"token", "sequence", "sequence_token", "product"}
    assert set(CLIPPING.names()) >= {"ppo", "weight", "none"}
    assert set(AGGREGATIONS.names()) >= {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                         "seq_mean_token_sum_norm"}
    assert set(KL_ESTIMATORS.names()) >= {"k1", "k2", "k3"}
    assert isinstance(CLIPPING.build("ppo", eps_low=0.2, eps_high=0.28), PPOClip)


@pytest.mark.parametrize("group,registry", [("advantage", ADVANTAGES), ("ratio", RATIOS), ("clip", CLIPPING),
                                            ("aggregation", AGGREGATIONS), ("correction", CORRECTIONS)])
def test_every_registered_component_has_a_config(group, registry):
    """Each registered name is one override away: some configs/<group>/*.yaml targets its class."""
    import importlib

    from omegaconf import OmegaConf

    from rlopt.resources import config_dir

    folder = os.path.join(config_dir(), group)
    reached = set()
    for f in os.listdir(folder):
        if f.endswith(".yaml"):
            module, _, cls = OmegaConf.load(os.path.join(folder, f))["_target_"].rpartition(".")
            reached.add(getattr(importlib.import_module(module), cls).registered_name)
    assert reached == set(registry.names()), set(registry.names()) ^ reached


@pytest.mark.parametrize("kw", [dict(ratio="bogus"), dict(clip="bogus"), dict(aggregation="bogus"),
                                dict(kl="bogus")])
def test_objective_rejects_unknown_component_names(kw):
    with pytest.raises(ValueError, match="bogus.*valid choices"):
        PolicyObjective(**kw)


# --- parameter ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize("make,param", [
    (lambda: PPOClip(eps_low=-0.1), "eps_low"),
    (lambda: PPOClip(eps_low=1.0), "eps_low"),
    (lambda: PPOClip(eps_low=1.5), "eps_low"),
    (lambda: PPOClip(0.2, eps_high=-0.01), "eps_high"),
    (lambda: PPOClip(0.2, dual_clip=1.0), "dual_clip"),
    (lambda: PPOClip(0.2, dual_clip=0.5), "dual_clip"),
    (lambda: PPOClip(0.2, 0.28, delta=1.28), "delta"),  # must exceed 1 + eps_high
    (lambda: PPOClip(0.2, 0.28, delta=1.1), "delta"),
    (lambda: WeightClip(eps_low=-0.1), "eps_low"),
    (lambda: WeightClip(eps_low=1.0), "eps_low"),
    (lambda: WeightClip(eps_high=-0.5), "eps_high"),
    (lambda: DiscountedReturn(gamma=0.0), "gamma"),
    (lambda: DiscountedReturn(gamma=-0.5), "gamma"),
    (lambda: DiscountedReturn(gamma=1.01), "gamma"),
    (lambda: DiscountedReturn(gamma=float("nan")), "gamma"),
    (lambda: GroupBaseline(eps=-1e-3), "eps"),
    (lambda: GroupBaseline(scale="bogus"), "scale"),
    (lambda: GroupBaseline(std="bogus"), "std"),
    (lambda: TokenRatio(max_log_ratio=0.0), "max_log_ratio"),
    (lambda: SeqMeanTokenSumNorm(max_len=0), "max_len"),
    (lambda: PolicyObjective(kl_coef=-1.0), "kl_coef"),
])
def test_out_of_range_parameters_raise_naming_the_parameter(make, param):
    with pytest.raises(ValueError, match=param):
        make()


def test_in_range_boundaries_are_accepted():
    PPOClip(eps_low=0.0)  # eps 0 is allowed (a degenerate clip)
    PPOClip(0.2, 0.28, dual_clip=1.0001, delta=1.2801)
    DiscountedReturn(gamma=1.0)  # gamma in (0, 1]
    WeightClip(None, None)


@pytest.mark.parametrize("est", [GroupBaseline(), GroupBaseline(leave_one_out=True), GroupContrast()],
                         ids=repr)
def test_group_estimators_validate_group_size(est):
    r, mask = torch.arange(6.0), torch.ones(6, 2)
    for g in (None, 0, 1):
        with pytest.raises(ValueError, match="group_size"):
            est(r, mask, group_size=g)
    with pytest.raises(ValueError, match="group_size=4"):  # 4 does not divide 6
        est(r, mask, group_size=4)
    with pytest.raises(ValueError, match="shape mismatch"):
        est(r[:5], mask, group_size=3)
    est(r, mask, group_size=3)  # fine


def test_discounted_return_needs_no_groups():
    DiscountedReturn(gamma=0.9)(torch.ones(3), torch.ones(3, 2))  # no group_size


def test_shape_mismatches_raise():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        TokenRatio()(a, b, a)
    with pytest.raises(ValueError, match="shape mismatch"):
        PolicyObjective()(a, a, b, a)  # advantages
    with pytest.raises(ValueError, match="shape mismatch"):
        PolicyObjective()(a, a, a, b)  # mask
    with pytest.raises(ValueError, match="ref_logp"):
        PolicyObjective(kl="k3", kl_coef=0.1)(a, a, a, a, ref_logp=b)


def test_kl_coef_without_estimator_raises():
    with pytest.raises(ValueError, match="kl_coef > 0"):
        PolicyObjective(kl_coef=0.04)
    obj = PolicyObjective(kl="k3", kl_coef=0.04)
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):  # kl_coef > 0 needs the reference log-probs
        obj(z, z, z, torch.ones(2, 3))


# --- presets -----------------------------------------------------------------------------------

def test_unknown_preset_raises_listing_choices():
    with pytest.raises(ValueError, match="no_such_algo.*valid choices.*grpo"):
        build_preset("no_such_algo")
    with pytest.raises(ValueError, match="preset part"):
        preset_spec("grpo", bogus={"x": 1})


def test_preset_override_and_component_swap():
    _, obj = build_preset("dapo", clip={"eps_high": 0.3})
    assert obj.clip.eps_low == 0.2 and obj.clip.eps_high == 0.3
    _, obj = build_preset("grpo", clip={"name": "weight", "eps_low": None, "eps_high": 0.28})
    assert isinstance(obj.clip, WeightClip) and obj.clip.eps_low is None
    assert preset_spec("dapo")["clip"]["eps_high"] == 0.28  # the preset itself is not mutated


def random_rollout(seed, n=8, t=6, g=4):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t)[None] < lens[:, None]).float()
    old = -torch.rand(n, t, generator=gen) * 3
    logp = old + 0.1 * torch.randn(n, t, generator=gen)
    ref = old + 0.1 * torch.randn(n, t, generator=gen)
    rewards = torch.randint(0, 3, (n,), generator=gen).float()
    return logp, old, ref, mask, rewards, g


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_and_runs_forward_backward(name):
    est, obj = build_preset(name)
    logp, old, ref, mask, rewards, g = random_rollout(preset_names().index(name))
    adv = est(rewards, mask, group_size=g)
    assert adv.shape == mask.shape and torch.isfinite(adv).all()
    x = logp.clone().requires_grad_(True)
    loss, metrics = obj(x, old, adv, mask, ref_logp=ref if obj.needs_reference else None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[mask == 0] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_named_presets_have_the_papers_settings():
    spec = {name: preset_spec(name) for name in ("gspo", "dapo", "grpo", "discounted_weight_clip", "cispo")}
    assert spec["gspo"]["clip"]["eps_low"] == 3e-4 and spec["gspo"]["clip"]["eps_high"] == 4e-4
    assert spec["dapo"]["clip"]["eps_high"] == 0.28
    assert spec["grpo"]["kl"]["coef"] == 0.04
    assert spec["discounted_weight_clip"]["advantage"]["gamma"] == 0.9
    assert spec["cispo"]["clip"]["eps_low"] is None


# --- metrics -----------------------------------------------------------------------------------

EXPECTED_KEYS = {"clip/token_low", "clip/token_high", "clip/token_region", "clip/seq_low",
                 "clip/seq_high", "clip/seq_region", "ratio/mean", "ratio/min", "ratio/max",
                 "advantage/mean", "advantage/std"}


def test_metrics_keys():
    logp, old, ref, mask, _, _ = random_rollout(0)
    adv = torch.randn_like(logp) * mask
    obj = PolicyObjective(kl="k3", kl_coef=0.0)
    _, m = obj(logp, old, adv, mask)
    assert EXPECTED_KEYS <= set(m) and "kl/mean" not in m and "entropy/mean" not in m
    _, m = obj(logp, old, adv, mask, ref_logp=ref, entropy=torch.rand_like(logp))
    assert EXPECTED_KEYS | {"kl/mean", "entropy/mean"} <= set(m)
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_clip_fraction_hand_computed():
    # 4 tokens: seq 0 = [1.5 (A>0), 1.0, 1.0], seq 1 = [1.0]; PPO eps 0.2: only 1.5 > 1.2 with
    # A > 0 is clipped -> token_high = 1/4; per sequence: seq 0 1/3, seq 1 0 -> seq_high 1/6
    logp = torch.tensor([[math.log(1.5), 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    old = torch.zeros(2, 3, dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0], [2.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=F64)
    _, m = PolicyObjective("token", PPOClip(0.2), "token_mean")(logp, old, adv, mask)
    assert m["clip/token_high"].item() == pytest.approx(0.25)
    assert m["clip/token_low"].item() == 0.0
    assert m["clip/token_region"].item() == pytest.approx(0.25)
    assert m["clip/seq_high"].item() == pytest.approx(1 / 6)  # mean(1/3, 0)
    assert m["clip/seq_region"].item() == pytest.approx(1 / 6)
    assert m["ratio/max"].item() == pytest.approx(1.5) and m["ratio/min"].item() == 1.0
    assert m["ratio/mean"].item() == pytest.approx(4.5 / 4)  # (1.5 + 1 + 1 + 1)/4
    # the same ratio with A < 0 is not clipped (the min does not bind on that side)
    _, m = PolicyObjective("token", PPOClip(0.2), "token_mean")(logp, old, -adv, mask)
    assert m["clip/token_high"].item() == 0.0 and m["clip/token_region"].item() == 0.0
