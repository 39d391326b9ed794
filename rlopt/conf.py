"""Hydra/OmegaConf helpers: resolvers and the pre-flight check of a composed config.

``check_config(cfg)`` builds the algorithm components (cheap) and checks the combination
before any model is loaded, so a config mistake costs seconds. Errors name the config key.
"""

from __future__ import annotations

import re
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def _run_name(override_dirname: str | None) -> str:
    name = re.sub(r"[/\\]", "_", override_dirname or "")
    return name or "default"


if not OmegaConf.has_resolver("rlopt_run_name"):
    OmegaConf.register_new_resolver("rlopt_run_name", _run_name)


def _build(cfg: DictConfig, key: str) -> Any:
    try:
        return instantiate(OmegaConf.select(cfg, key))
    except Exception as e:  # noqa: BLE001 - re-raised naming the key
        cause = e.__cause__ or e
        raise ValueError(f"config key {key!r}: {cause}") from e


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Validate the composed config; return the built algorithm components."""
    from .algorithms import PolicyObjective

    parts = {k: _build(cfg, k) for k in ("advantage", "ratio", "clip", "aggregation", "rollout", "correction")}
    parts["masks"] = {k: _build(cfg, f"masks.{k}") for k in (cfg.get("masks") or {})}
    try:
        parts["advantage"].check_group_size(cfg.group_size)
    except ValueError as e:
        raise ValueError(f"config key 'group_size': {e}") from None
    for key in ("ppo_epochs", "num_minibatches", "data.batch_size", "steps"):
        if int(OmegaConf.select(cfg, key)) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {OmegaConf.select(cfg, key)}")
    n = int(cfg.data.batch_size) * int(cfg.group_size)
    if n % int(cfg.num_minibatches) != 0:
        raise ValueError(f"config key 'num_minibatches'={cfg.num_minibatches} does not divide the rollout batch "
                         f"of data.batch_size x group_size = {n} completions")
    if cfg.micro_batch_size is not None and int(cfg.micro_batch_size) < 1:
        raise ValueError(f"config key 'micro_batch_size' must be >= 1 or null, got {cfg.micro_batch_size}")
    try:
        parts["objective"] = PolicyObjective(parts["ratio"], parts["clip"], parts["aggregation"], kl=cfg.kl.estimator,
                                             kl_coef=cfg.kl.coef, entropy_coef=cfg.entropy.coef,
                                             correction=parts["correction"], masks=parts["masks"],
                                             kl_is_corrected=bool(cfg.kl.get("is_corrected", False)),
                                             kl_is_detached=bool(cfg.kl.get("is_detached", False)))
    except ValueError as e:
        raise ValueError(f"config key 'kl' / 'entropy' / 'correction' / 'masks': {e}") from None
    if not cfg.task.rewards:
        raise ValueError("config key 'task.rewards' is empty: at least one reward function is required")
    return parts


def check_parts(advantage: Any, objective: Any, group_size: int, micro_batch_size: int | None,
                ppo_epochs: int = 1, num_minibatches: int = 1) -> None:
    """Check that the composed parts fit the module's layout (``PolicyOptModule`` calls it): the
    advantage's group size, Dr. GRPO's explicit constant length, per-prompt aggregations' groups."""
    from .algorithms import SeqMeanTokenSumNorm

    for name, value in (("ppo_epochs", ppo_epochs), ("num_minibatches", num_minibatches)):
        if int(value) < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    advantage.check_group_size(group_size)
    agg = objective.aggregation
    if isinstance(agg, SeqMeanTokenSumNorm) and agg.max_len is None:
        raise ValueError("aggregation seq_mean_token_sum_norm (Dr. GRPO) needs its constant max_len: build it "
                         "with max_len=<the rollout's max_new_tokens> (the config sets "
                         "aggregation.max_len: ${rollout.max_new_tokens})")
    if getattr(agg, "requires_whole_groups", False):
        if getattr(agg, "group_size", group_size) != group_size:
            raise ValueError(f"aggregation {agg.registered_name} has group_size={agg.group_size}; the module's group_size "
                             f"is {group_size}: set them equal (the config does: group_size: ${{group_size}})")
        if micro_batch_size is not None and int(micro_batch_size) % group_size:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be a multiple of group_size={group_size}: "
                             f"aggregation {agg.registered_name} normalises per prompt and needs whole groups")
