"""What ``rlopt-train`` prints: the composed algorithm in one line, a progress bar with the reward,
and nothing else from the libraries underneath but real problems.

    quiet_libraries()                             # the CLI calls it once, before building anything
    print(algorithm_line(advantage, objective))   # "algorithm grpo: advantage=group_baseline(...) | ..."

Each silenced message is listed below with the reason it is harmless for rlopt; every filter
matches one message (and, for warnings, the module that raises it), so anything else still shows.
Library users (``trainer.fit`` in their own scripts) get the libraries' defaults: only the CLI
calls ``quiet_libraries``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

# Lightning's rank-zero info lines that describe the machine or advertise a product, not the run:
# "GPU available: False, used: False", "TPU available: ...", "HPU available: ...", and the
# "💡 Tip: ... litlogger" advertisement printed whenever the run has no LitLogger, and
# "`Trainer.fit` stopped: `max_steps=N` reached." (rlopt's summary line says the steps).
_LIGHTNING_INFO_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "`Trainer.fit` stopped:")

_WARNINGS = [
    # Lightning's own pytree helper uses a torch API that torch deprecated; nothing a user can change,
    # and Lightning's behaviour is unaffected.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # rlopt checkpoints after a rollout step's updates on purpose: that is the state a resume continues
    # from (tests/test_reliability.py resumes bit for bit); Lightning's advice targets another pattern.
    (r"Using ModelCheckpoint with manual optimization", r"lightning\.pytorch\.callbacks\.model_checkpoint"),
]


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Install the filters above, and turn off transformers' per-file progress bars (weights
    written and loaded in well under a second for the tiny model)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in log.filters):
            log.addFilter(_DropPrefixes(_LIGHTNING_INFO_PREFIXES))
    for message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def ignore_reference_eval_mode_warning(module: Any) -> None:
    """Lightning warns when modules are in eval mode at the start of training. The frozen reference
    policy (``ref_policy``) is in eval mode by design; silence the warning only when the reference's
    modules are the only ones in eval mode, so a policy left in eval mode still warns."""
    in_eval = [name for name, m in module.named_modules() if not m.training]
    if in_eval and all(name.startswith("ref_policy") for name in in_eval):
        warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode",
                                module=r"lightning\.pytorch\.loops\.fit_loop")


def _params(component: Any) -> str:
    params = component.params() if hasattr(component, "params") else {}
    inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"({inner})" if inner else ""


def algorithm_line(advantage: Any, objective: Any, name: str | None = None) -> str:
    """One line naming every composed part and its parameters."""
    parts = [f"advantage={advantage.registered_name}{_params(advantage)}",
             f"ratio={objective.ratio.registered_name}{_params(objective.ratio)}",
             f"clip={objective.clip.registered_name}{_params(objective.clip)}",
             f"aggregation={objective.aggregation.registered_name}{_params(objective.aggregation)}",
             f"kl={objective.kl_name}(coef={objective.kl_coef:g})" if objective.kl_name else "kl=none",
             f"entropy_coef={objective.entropy_coef:g}"]
    correction = getattr(objective, "correction", None)
    if correction is not None and correction.registered_name != "none":
        parts.append(f"correction={correction.registered_name}{_params(correction)}")
    masks = getattr(objective, "masks", None) or {}
    if masks:
        parts.append("masks=[" + ", ".join(f"{k}{_params(m)}" for k, m in masks.items()) + "]")
    return f"[rlopt] algorithm {name or ''}: " + " | ".join(parts)


class RewardProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting rollout steps, with the mean reward (and the latest held-out
    metrics) as its only figures; validation runs without a bar of its own."""

    def on_validation_start(self, *args: Any) -> None:
        pass

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("rollout steps")
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.total = trainer.max_steps

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return {k: v for k, v in metrics.items() if k == "reward" or k.startswith("val/")}
