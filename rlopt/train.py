"""``rlopt-train`` / ``python -m rlopt.train``: Hydra entry point.

    rlopt-train                                   # the embedded default (tiny model, GRPO, CPU)
    rlopt-train algorithm=gspo num_minibatches=4  # GSPO, off-policy minibatches
    rlopt-train algorithm=gspo ratio=token        # a hybrid
    rlopt-train --cfg job                         # print the composed config
    rlopt-train debug=default                     # a seconds-long smoke run

``run(cfg)`` does the work and is what tests call with a composed config.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .algorithms.registry import check_range
from .algorithms.regularisers import AdaptiveEntropyCoef
from .conf import check_config
from .console import RewardProgressBar, algorithm_line, quiet_libraries
from .data import PromptDataModule
from .logprobs import CompletionLogProbs
from .module import PolicyOptModule
from .resources import config_dir, sweeps_dir
from .rewards import RewardSet
from .rollout.dynamic import DynamicSampling
from .rollout.pipeline import AsyncRollouts
from .warmup import supervised_warmup

log = logging.getLogger("rlopt")
CONFIG_DIR = config_dir()  # configs/ in a checkout, rlopt/configs in a wheel (rlopt/resources.py)


def build(cfg: DictConfig) -> tuple[PolicyOptModule, PromptDataModule, L.Trainer]:
    """Compose the module, data module and trainer from a config (checks it first)."""
    parts = check_config(cfg)  # fails here, before any model is loaded, on a bad combination
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    policy, tokenizer = instantiate(cfg.model)
    ds = cfg.get("dynamic_sampling") or {}
    dynamic = DynamicSampling(cfg.data.batch_size, ds.get("max_gen_batches", 3), ds.get("min_std", 1e-6),
                              ds.get("on_exhausted", "train")) if ds.get("enabled") else None
    dm = PromptDataModule(instantiate(cfg.task.train), instantiate(cfg.task.val) if cfg.task.val else None,
                          batch_size=cfg.data.batch_size * (dynamic.max_gen_batches if dynamic else 1), val_batch_size=cfg.data.val_batch_size, seed=int(cfg.seed),
                          tokenizer=tokenizer, chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt,
                          shuffle=bool(cfg.data.get("shuffle", True)))
    dm.setup("fit")
    if int(cfg.task.get("warmup_steps") or 0) > 0 and not cfg.get("ckpt_path"):
        losses = supervised_warmup(policy, tokenizer, dm.train_rows, int(cfg.task.warmup_steps), seed=int(cfg.seed))
        log.info("supervised warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    rewards = RewardSet({k: instantiate(v) for k, v in cfg.task.rewards.items()},
                        OmegaConf.to_container(cfg.task.reward_weights) if cfg.task.get("reward_weights") else None,
                        nan_policy=cfg.reward_nan_policy)
    module = PolicyOptModule(
        policy, tokenizer, parts["advantage"], parts["objective"], rewards,
        optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        rollout=parts["rollout"], group_size=cfg.group_size, ppo_epochs=cfg.ppo_epochs,
        num_minibatches=cfg.num_minibatches, micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm,
        accuracy_fn=instantiate(cfg.task.accuracy_fn) if cfg.task.get("accuracy_fn") else None,
        log_samples_every=cfg.log_samples_every, max_consecutive_skips=cfg.max_consecutive_skips, seed=int(cfg.seed),
        logprobs=CompletionLogProbs(parts["rollout"].temperature, share_prompt=bool(cfg.get("share_prompt", True)),
                                    pack=bool(cfg.get("pack", True)), pack_max_row=int(cfg.get("pack_max_row", 2048)),
                                    pack_attention=str(cfg.get("pack_attention", "auto")),
                                    chunked_lm_head=bool(cfg.get("chunked_lm_head", False)),
                                    saved_mib=float(cfg.get("lm_head_saved_mib", 0))),
        log_entropy=bool(cfg.get("log_entropy", True)),
        entropy_controller=AdaptiveEntropyCoef.from_config(cfg.entropy) if cfg.entropy.get("adaptive") else None,
        ref_sync_every=int(cfg.kl.get("ref_sync_every") or 0), ref_sync_alpha=float(cfg.kl.get("ref_sync_alpha", 0.6)),
        staleness=int(OmegaConf.select(cfg, "offpolicy.staleness", default=0) or 0),
        dynamic_sampling=dynamic,
        async_rollouts=async_rollouts(cfg.get("offpolicy") or {}),
    )
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.trainer.get("enable_progress_bar", True) is not False:
        callbacks.append(RewardProgressBar())
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    return module, dm, trainer


def async_rollouts(off: Any) -> AsyncRollouts | None:
    """``offpolicy.async``: the rollout worker (rollout/pipeline.py); ``offpolicy.trainer_threads``
    sets this process's torch threads (the worker has ``offpolicy.worker_threads`` of its own)."""
    if not off.get("async"):
        return None
    if off.get("trainer_threads") is not None:
        torch.set_num_threads(int(check_range("offpolicy.trainer_threads", off.trainer_threads, low=1)))
    return AsyncRollouts(max_lag=int(off.get("max_lag", 1)), worker_threads=int(off.get("worker_threads", 1)),
                         borrow_threads=bool(off.get("borrow_threads", False)))


def run(cfg: DictConfig) -> dict[str, Any]:
    module, dm, trainer = build(cfg)
    if trainer.is_global_zero:
        line = algorithm_line(module.advantage, module.objective, cfg.get("algorithm_name"))
        if module.dynamic_sampling is not None:
            line += f" | dynamic_sampling(max_gen_batches={module.dynamic_sampling.max_gen_batches})"
        if module.behaviour.stale.staleness:
            line += f" | staleness={module.behaviour.stale.staleness}"
        if module.pipeline is not None:
            line += f" | async(max_lag={module.pipeline.max_lag}, worker_threads={module.pipeline.worker_threads})"
        print(line)
    if cfg.get("validate_before") and not cfg.get("ckpt_path"):
        before = trainer.validate(module, datamodule=dm, verbose=False)
        module.validation_before = {k: float(v) for k, v in (before[0] if before else {}).items()}
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    history = module.reward_history
    summary: dict[str, Any] = {"steps": trainer.global_step, "reward_history": history}
    if history:
        k = min(10, len(history))
        summary["reward_first10"] = sum(history[:k]) / k
        summary["reward_last10"] = sum(history[-k:]) / k
    summary["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    summary["val_before"] = getattr(module, "validation_before", {})
    if cfg.get("export_dir"):  # every rank: a sharded (FSDP) policy is gathered by all ranks; rank 0 writes
        summary["export_dir"] = module.export(cfg.export_dir)
    if trainer.logger is not None:
        summary["log_dir"] = trainer.logger.log_dir
    if trainer.is_global_zero:
        print(f"[rlopt] {summary['steps']} steps; mean reward first 10 steps {summary.get('reward_first10', float('nan')):.3f}"
              f" -> last 10 steps {summary.get('reward_last10', float('nan')):.3f}")
        for k, v in summary["val"].items():
            before = summary["val_before"].get(k)
            print(f"[rlopt] {k} = {v:.3f}" + ("" if before is None else f"  (before training: {before:.3f})"))
        if "log_dir" in summary:
            print(f"[rlopt] TensorBoard logs: {os.path.abspath(summary['log_dir'])}  (tensorboard --logdir {os.path.abspath(cfg.log_root)})")
        if "export_dir" in summary:
            print(f"[rlopt] final policy (save_pretrained): {os.path.abspath(summary['export_dir'])}")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Returns the mean reward of the last 10 steps (the objective Hydra sweepers maximise).

    In a multirun, a failing run writes ``FAILED.txt`` (the traceback) into its run folder and
    returns -inf (the worst value for a maximised reward) instead of stopping the sweep;
    ``rlopt-report`` lists it. Not NaN: the Optuna sweeper aborts the whole search on a NaN.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    _STARTED.append(True)
    quiet_libraries()  # again: a sweep's launcher runs this in worker processes
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        try:
            return run(cfg).get("reward_last10")
        except (ValueError, InstantiationException) as e:  # a bad config key or input: one readable line, exit 2
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
            if not isinstance(cause, ValueError):
                raise
            print(f"rlopt-train: error: {cause}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
            sys.exit(2)
    try:
        return run(cfg).get("reward_last10")
    except Exception:  # noqa: BLE001 - one failed run must not end the sweep
        import traceback

        with open(os.path.join(HydraConfig.get().runtime.output_dir, "FAILED.txt"), "w") as f:
            f.write(traceback.format_exc())
        log.exception("run failed; the sweep goes on")
        return float("-inf")


_STARTED: list[bool] = []  # set once the task function runs: later failures are not config errors


_TAKES_VALUE = {"--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp", "--cfg", "-c",
                "--package", "-p", "--experimental-rerun"}
_INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info's optional value


def _first_override(argv: list[str]) -> int:
    """Index of the first Hydra override in ``argv`` (len(argv) when there is none)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _TAKES_VALUE or (a == "--info" and i + 1 < len(argv) and argv[i + 1] in _INFO):
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            return i
    return len(argv)


def with_shipped_sweeps(argv: list[str]) -> list[str]:
    """Command-line arguments with the shipped sweeps on Hydra's search path (so a sweep file of
    the user's own can say ``defaults: [sweep_base]``), and, when ``--config-name`` names a sweep
    that is neither among the configs nor in a ``--config-dir``, that sweeps folder as the config
    dir: ``rlopt-train --config-name grpo_vs_gspo -m`` works from any folder."""
    argv = list(argv)
    if not any(a.startswith("hydra.searchpath") for a in argv):
        # next to the user's overrides: Hydra's parser takes one run of them (`... --cfg job` after
        # the overrides would otherwise leave a second run it rejects)
        argv.insert(_first_override(argv), f"hydra.searchpath=[file://{sweeps_dir()}]")
    name = None
    for i, a in enumerate(argv):
        if a in ("--config-name", "-cn") and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--config-name="):
            name = a.split("=", 1)[1]
    has_dir = any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv)
    if name and not has_dir and not os.path.exists(os.path.join(CONFIG_DIR, f"{name}.yaml")) \
            and os.path.exists(os.path.join(sweeps_dir(), f"{name}.yaml")):
        argv = ["--config-dir", sweeps_dir(), *argv]
    return argv


def main() -> None:
    """``rlopt-train``: quiet libraries, the shipped sweeps on the search path, and exit status 2 with
    one readable message for a config error (Hydra's own composition errors included)."""
    quiet_libraries()
    sys.argv = [sys.argv[0], *with_shipped_sweeps(sys.argv[1:])]
    try:
        _hydra_main()
    except SystemExit as e:
        if e.code not in (0, None) and not _STARTED:  # Hydra stopped before the run: a composition error
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
