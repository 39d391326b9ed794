"""Named algorithm presets: each is a choice of advantage x ratio x clip x aggregation (+ KL).

    from rlopt.algorithms import build_preset
    advantage, objective = build_preset("gspo")
    advantage, objective = build_preset("dapo", clip={"eps_high": 0.3})   # override a parameter

The Hydra configs ``configs/algorithm/<name>.yaml`` state the same choices; a test checks that
both build identical components.
"""

from __future__ import annotations

import copy
from typing import Any

from .objective import PolicyObjective
from .registry import ADVANTAGES, AGGREGATIONS, CLIPPING, RATIOS

_GRPO_ADV = {"name": "group_baseline", "scale": "group", "std": "unbiased", "eps": 1e-6, "leave_one_out": False}

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath (2402.03300): group-normalised outcome reward, token ratio, PPO clip 0.2,
    # mean over tokens then sequences, k3 KL with beta 0.04.
    "grpo": {
        "advantage": dict(_GRPO_ADV),
        "ratio": {"name": "token"},
        "clip": {"name": "ppo", "eps_low": 0.2, "eps_high": 0.2},
        "aggregation": {"name": "seq_mean_token_mean"},
        "loss": {"kl": "k3", "kl_coef": 0.04, "entropy_coef": 0.0},
    },
    # GSPO (2507.18071): group advantage, sequence ratio (geometric mean), clip 3e-4 / 4e-4.
    "gspo": {
        "advantage": dict(_GRPO_ADV),
        "ratio": {"name": "sequence"},
        "clip": {"name": "ppo", "eps_low": 3e-4, "eps_high": 4e-4},
        "aggregation": {"name": "seq_mean_token_mean"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # GSPO-token (2507.18071 eqs. 13-14): same value as GSPO, per-token gradient path.
    "gspo_token": {
        "advantage": dict(_GRPO_ADV),
        "ratio": {"name": "sequence_token"},
        "clip": {"name": "ppo", "eps_low": 3e-4, "eps_high": 4e-4},
        "aggregation": {"name": "seq_mean_token_mean"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # DAPO (2503.14476): clip-higher 0.2 / 0.28, token-mean aggregation, no KL.
    "dapo": {
        "advantage": dict(_GRPO_ADV),
        "ratio": {"name": "token"},
        "clip": {"name": "ppo", "eps_low": 0.2, "eps_high": 0.28},
        "aggregation": {"name": "token_mean"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # Dr. GRPO (2503.20783): no std scaling, token sums over a constant length, no KL.
    "dr_grpo": {
        "advantage": {**_GRPO_ADV, "scale": "none"},
        "ratio": {"name": "token"},
        "clip": {"name": "ppo", "eps_low": 0.2, "eps_high": 0.2},
        "aggregation": {"name": "seq_mean_token_sum_norm", "max_len": None},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # RLOO (2402.14740): leave-one-out baseline, no scaling; PPO clip for off-policy minibatches.
    "rloo": {
        "advantage": {**_GRPO_ADV, "scale": "none", "leave_one_out": True},
        "ratio": {"name": "token"},
        "clip": {"name": "ppo", "eps_low": 0.2, "eps_high": 0.2},
        "aggregation": {"name": "seq_mean_token_mean"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # CISPO (MiniMax-M1, 2506.13585): clipped stop-gradient weight, no lower bound, token mean.
    "cispo": {
        "advantage": dict(_GRPO_ADV),
        "ratio": {"name": "token"},
        "clip": {"name": "weight", "eps_low": None, "eps_high": 0.28},
        "aggregation": {"name": "token_mean"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # The seed's GRPO: discounted return of the terminal reward (gamma 0.9, no baseline),
    # clipped stop-gradient weight eps 0.2, sum over tokens.
    "seed_grpo": {
        "advantage": {"name": "discounted_return", "gamma": 0.9, "whiten": False, "eps": 1e-6},
        "ratio": {"name": "token"},
        "clip": {"name": "weight", "eps_low": 0.2, "eps_high": 0.2},
        "aggregation": {"name": "seq_mean_token_sum"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
    # The seed's GSPO: +1/|good|, -1/|bad| contrast, sequence ratio, no clip.
    "seed_gspo": {
        "advantage": {"name": "group_contrast", "atol": 1e-6},
        "ratio": {"name": "sequence"},
        "clip": {"name": "none"},
        "aggregation": {"name": "seq_mean_token_mean"},
        "loss": {"kl": None, "kl_coef": 0.0, "entropy_coef": 0.0},
    },
}


def preset_spec(name: str, **overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's spec (a fresh copy), with per-part parameter overrides merged in."""
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm preset {name!r}; valid choices: {', '.join(sorted(PRESETS))}")
    spec = copy.deepcopy(PRESETS[name])
    for part, params in overrides.items():
        if part not in spec:
            raise ValueError(f"unknown preset part {part!r}; valid choices: {', '.join(spec)}")
        if "name" in params and params["name"] != spec[part].get("name"):
            spec[part] = dict(params)  # a different component: take only the given parameters
        else:
            spec[part].update(params)
    return spec


def build_component(kind: str, spec: dict[str, Any]) -> Any:
    registry = {"advantage": ADVANTAGES, "ratio": RATIOS, "clip": CLIPPING, "aggregation": AGGREGATIONS}[kind]
    params = dict(spec)
    return registry.build(params.pop("name"), **params)


def build_preset(name: str, **overrides: dict[str, Any]) -> tuple[Any, PolicyObjective]:
    """Build ``(advantage_estimator, objective)`` for a named preset."""
    spec = preset_spec(name, **overrides)
    objective = PolicyObjective(
        ratio=build_component("ratio", spec["ratio"]),
        clip=build_component("clip", spec["clip"]),
        aggregation=build_component("aggregation", spec["aggregation"]),
        **spec["loss"],
    )
    return build_component("advantage", spec["advantage"]), objective
