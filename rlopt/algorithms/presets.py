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

Two more groups describe the three-policy parts (docs/behaviour-correction.md): ``correction``
(one component, like ``clip``) and ``masks``, a dict of named mask entries. A preset selects one
or several mask options (``override /masks: opsm`` or ``override /masks: [opsm, truncated]``:
their entries are merged) and may set parameters per entry (``masks: {opsm: {delta: 0.1}}``).
The built objective carries them: ``objective.correction`` and ``objective.masks``
(``{name: TokenMask}``). Overrides: ``build_preset("grpo_tis", correction={"cap": 3.0})``,
``build_preset("dapo", masks={"high_entropy": {"name": "high_entropy", "rho": 0.3}})`` (an entry
set to None is removed). A group missing from ``train.yaml``'s defaults defaults to ``none``.
"""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any

from omegaconf import OmegaConf

from .objective import PolicyObjective
from .registry import ADVANTAGES, AGGREGATIONS, CLIPPING, CORRECTIONS, MASKS, RATIOS, Registry

# algorithm config group -> registry of its components (the groups whose YAML has a _target_)
COMPONENT_GROUPS: dict[str, Registry] = {
    "advantage": ADVANTAGES, "ratio": RATIOS, "clip": CLIPPING, "aggregation": AGGREGATIONS,
    "correction": CORRECTIONS,
}
# algorithm config groups of plain parameters
PARAM_GROUPS = ("kl", "entropy")
# the config group of named token masks: {name: component YAML}
MASK_GROUP = "masks"
# the option of a group that train.yaml does not select (yet)
GROUP_FALLBACK = {"correction": "none", MASK_GROUP: "none"}


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
    registry = MASKS if group == MASK_GROUP else COMPONENT_GROUPS[group]
    module, _, cls = params.pop("_target_").rpartition(".")
    name = getattr(getattr(importlib.import_module(module), cls), "registered_name", None)
    if name is None or name not in registry:
        raise ValueError(f"{group} config target {module}.{cls} is not a registered {registry.kind}")
    return {"name": name, **params}


def _mask_specs(options: Any) -> dict[str, dict[str, Any]]:
    """The merged entries of one or several ``masks`` options, ``{entry: {"name": ..., **params}}``."""
    specs: dict[str, dict[str, Any]] = {}
    for option in ([options] if isinstance(options, str) else list(options or [])):
        for key, node in _load(MASK_GROUP, option).items():
            specs[key] = _component_spec(node, MASK_GROUP)
    return specs


def _merge_masks(specs: dict[str, dict[str, Any]], changes: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Merge per-entry parameters into mask specs; an entry with another ``name`` is replaced, a
    new entry needs a ``name`` (or a key that is a registered mask), None removes an entry."""
    for key, params in (changes or {}).items():
        if params is None:
            specs.pop(key, None)
            continue
        params = copy.deepcopy(dict(params))
        if key in specs and params.get("name", specs[key]["name"]) == specs[key]["name"]:
            specs[key].update(params)
        else:
            specs[key] = {"name": params.pop("name", key), **params}
            MASKS.get(specs[key]["name"])  # an unknown mask name fails here, listing the choices
    return specs


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
    chosen = {**GROUP_FALLBACK, **_train_defaults(), **chosen}
    spec: dict[str, Any] = {}
    for group in (*COMPONENT_GROUPS, *PARAM_GROUPS):
        base = _load(group, chosen[group])
        spec[group] = _component_spec(base, group) if group in COMPONENT_GROUPS else base
        spec[group].update(node.get(group) or {})  # parameters the preset sets on top
    spec[MASK_GROUP] = _merge_masks(_mask_specs(chosen[MASK_GROUP]), node.get(MASK_GROUP))
    for part, params in overrides.items():
        if part not in spec:
            raise ValueError(f"unknown preset part {part!r}; valid choices: {', '.join(spec)}")
        if part == MASK_GROUP:
            spec[part] = _merge_masks(spec[part], params)
        elif "name" in params and params["name"] != spec[part].get("name"):
            spec[part] = copy.deepcopy(dict(params))  # a different component: take only the given parameters
        else:
            spec[part].update(copy.deepcopy(params))
    return spec


def _train_defaults() -> dict[str, str]:
    """The option ``train.yaml`` selects for each component group (used where a preset names none)."""
    node = OmegaConf.to_container(OmegaConf.load(os.path.join(_config_dir(), "train.yaml")), resolve=False)
    return {k: v for e in node.get("defaults", []) if isinstance(e, dict) for k, v in e.items()}


def build_component(kind: str, spec: dict[str, Any]) -> Any:
    """Build one component from ``{"name": registered name, **parameters}`` (``kind="masks"``: one mask)."""
    params = dict(spec)
    registry = MASKS if kind == MASK_GROUP else COMPONENT_GROUPS[kind]
    return registry.build(params.pop("name"), **params)


def build_objective(spec: dict[str, Any]) -> PolicyObjective:
    """The ``PolicyObjective`` of a preset spec (ratio, clip, aggregation, KL, entropy, correction
    and masks groups)."""
    masks = spec.get(MASK_GROUP) or {}
    return PolicyObjective(
        ratio=build_component("ratio", spec["ratio"]),
        clip=build_component("clip", spec["clip"]),
        aggregation=build_component("aggregation", spec["aggregation"]),
        kl=spec["kl"].get("estimator"), kl_coef=spec["kl"].get("coef", 0.0),
        entropy_coef=spec["entropy"].get("coef", 0.0),
        correction=build_component("correction", spec["correction"]) if "correction" in spec else None,
        masks={name: build_component(MASK_GROUP, m) for name, m in masks.items()},
        kl_is_corrected=spec["kl"].get("is_corrected", False),
        kl_is_detached=spec["kl"].get("is_detached", False),
    )


def build_preset(name: str, **overrides: dict[str, Any]) -> tuple[Any, PolicyObjective]:
    """Build ``(advantage_estimator, objective)`` for a named preset (``objective.correction`` and
    ``objective.masks`` hold its behaviour correction and token masks)."""
    spec = preset_spec(name, **overrides)
    return build_component("advantage", spec["advantage"]), build_objective(spec)
