"""Named algorithm presets, read from their one source: ``configs/algorithm/<name>.yaml``.

    from rlopt.algorithms import build_preset
    advantage, objective = build_preset("gspo")
    advantage, objective = build_preset("dapo", clip={"eps_high": 0.3})   # override a parameter
    advantage, objective = build_preset("grpo", clip={"name": "weight", "eps_high": 0.28})  # swap a part

A preset file selects one option of each algorithm config group (``override /clip: ppo_higher``)
and may set parameters on top (``clip: {eps_high: 0.3}``). The CLI composes the same files with
Hydra (``rlopt-train algorithm=dapo``); this module reads them with OmegaConf alone, so the pure
math needs no Hydra run. A parameter that the YAML interpolates from another group (Dr. GRPO's
``aggregation.max_len: ${rollout.max_new_tokens}``) is left ``None`` here: pass it explicitly.
A test checks that both routes build identical components for every preset.
"""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any

from omegaconf import OmegaConf

from .objective import PolicyObjective
from .registry import ADVANTAGES, AGGREGATIONS, CLIPPING, RATIOS, Registry

# algorithm config group -> registry of its components (the groups whose YAML has a _target_)
COMPONENT_GROUPS: dict[str, Registry] = {
    "advantage": ADVANTAGES, "ratio": RATIOS, "clip": CLIPPING, "aggregation": AGGREGATIONS,
}
# algorithm config groups of plain parameters
PARAM_GROUPS = ("kl", "entropy")


def _config_dir() -> str:
    from ..resources import config_dir  # the shipped configs (rlopt.configs)

    return config_dir()


def preset_names() -> list[str]:
    """Every preset: the files of ``configs/algorithm/``."""
    folder = os.path.join(_config_dir(), "algorithm")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def _load(group: str, option: str) -> dict[str, Any]:
    path = os.path.join(_config_dir(), group, f"{option}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"no config {group}/{option}.yaml (in {_config_dir()})")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: None if isinstance(v, str) and v.startswith("${") else v for k, v in (node or {}).items()}


def _component_spec(node: dict[str, Any], group: str) -> dict[str, Any]:
    """A component YAML (``_target_`` + parameters) as ``{"name": registered name, **parameters}``."""
    params = dict(node)
    module, _, cls = params.pop("_target_").rpartition(".")
    name = getattr(getattr(importlib.import_module(module), cls), "registered_name", None)
    if name is None or name not in COMPONENT_GROUPS[group]:
        raise ValueError(f"{group} config target {module}.{cls} is not a registered {COMPONENT_GROUPS[group].kind}")
    return {"name": name, **params}


def _preset_file(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown algorithm preset {name!r}; valid choices: {', '.join(names)}")
    return _load("algorithm", name)


def preset_spec(name: str, **overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset as ``{group: {"name": ..., **parameters}}`` (plain-parameter groups without a
    name), with per-group overrides merged in. An override with another ``name`` swaps the
    component and takes only the parameters given."""
    node = _preset_file(name)
    chosen: dict[str, str] = {}
    for entry in node.get("defaults", []):
        for key, option in (entry.items() if isinstance(entry, dict) else ()):
            group = key.replace("override", "").strip().lstrip("/")
            chosen[group] = option
    chosen = {**_train_defaults(), **chosen}
    spec: dict[str, Any] = {}
    for group in (*COMPONENT_GROUPS, *PARAM_GROUPS):
        base = _load(group, chosen[group])
        spec[group] = _component_spec(base, group) if group in COMPONENT_GROUPS else base
        spec[group].update(node.get(group) or {})  # parameters the preset sets on top
    for part, params in overrides.items():
        if part not in spec:
            raise ValueError(f"unknown preset part {part!r}; valid choices: {', '.join(spec)}")
        if "name" in params and params["name"] != spec[part].get("name"):
            spec[part] = copy.deepcopy(dict(params))  # a different component: take only the given parameters
        else:
            spec[part].update(copy.deepcopy(params))
    return spec


def _train_defaults() -> dict[str, str]:
    """The option ``train.yaml`` selects for each component group (used where a preset names none)."""
    node = OmegaConf.to_container(OmegaConf.load(os.path.join(_config_dir(), "train.yaml")), resolve=False)
    return {k: v for e in node.get("defaults", []) if isinstance(e, dict) for k, v in e.items()}


def build_component(kind: str, spec: dict[str, Any]) -> Any:
    """Build one component from ``{"name": registered name, **parameters}``."""
    params = dict(spec)
    return COMPONENT_GROUPS[kind].build(params.pop("name"), **params)


def build_objective(spec: dict[str, Any]) -> PolicyObjective:
    """The ``PolicyObjective`` of a preset spec (ratio, clip, aggregation, KL and entropy groups)."""
    return PolicyObjective(
        ratio=build_component("ratio", spec["ratio"]),
        clip=build_component("clip", spec["clip"]),
        aggregation=build_component("aggregation", spec["aggregation"]),
        kl=spec["kl"].get("estimator"), kl_coef=spec["kl"].get("coef", 0.0),
        entropy_coef=spec["entropy"].get("coef", 0.0),
    )


def build_preset(name: str, **overrides: dict[str, Any]) -> tuple[Any, PolicyObjective]:
    """Build ``(advantage_estimator, objective)`` for a named preset."""
    spec = preset_spec(name, **overrides)
    return build_component("advantage", spec["advantage"]), build_objective(spec)
