"""Lightning callbacks for rlopt runs.

    trainer = L.Trainer(logger=TensorBoardLogger("runs", name="grpo"), callbacks=[ClipFractionLayout()])
    # configs/callbacks/default.yaml adds it to every rlopt-train run

``ClipFractionLayout`` writes a TensorBoard *custom scalars* layout into the run's TensorBoard
experiment when training starts (global rank 0 only). In TensorBoard's "Custom Scalars" tab,
each chart then holds that tag for *every* run under the ``--logdir`` (one line per run), and
the token and sequence clip-fraction charts (low / high / region) sit side by side:

    tensorboard --logdir multirun/grpo_vs_gspo/<date>_quick     # then open "Custom Scalars"

Without a TensorBoard logger (``logger=none``, another logger) the callback does nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from .algorithms.clipping import CLIP_FLAGS, CLIP_MAIN_FLAGS



def _tag(tag: str) -> str:
    return f"^{tag}$"  # chart tags are regular expressions: match the tag exactly


def clip_fraction_layout() -> dict[str, dict[str, list[Any]]]:
    """The layout: ``{category: {chart title: ["Multiline" | "Margin", [tag regexes]]}}``."""
    return {
        "clip fractions": {
            **{f"token {k}": ["Multiline", [_tag(f"clip/token_{k}")]] for k in CLIP_MAIN_FLAGS},
            **{f"sequence {k}": ["Multiline", [_tag(f"clip/seq_{k}")]] for k in CLIP_MAIN_FLAGS},
        },
        "clip fractions (other flags)": {
            f"{level} {k}": ["Multiline", [_tag(f"clip/{prefix}_{k}")]]
            for level, prefix in (("token", "token"), ("sequence", "seq")) for k in CLIP_FLAGS if k not in CLIP_MAIN_FLAGS
        },
        "reward and ratio": {
            "reward": ["Multiline", [_tag("reward/mean")]],
            "ratio mean [min, max]": ["Margin", [_tag("ratio/mean"), _tag("ratio/min"), _tag("ratio/max")]],
            "KL": ["Multiline", [_tag("kl/mean")]],
            "entropy": ["Multiline", [_tag("entropy/mean")]],
        },
    }


class ClipFractionLayout(L.Callback):
    """Write :func:`clip_fraction_layout` (or ``layout``) to every TensorBoard logger on train start."""

    def __init__(self, layout: dict[str, dict[str, list[Any]]] | None = None) -> None:
        self.layout = layout
        self.written: list[str] = []  # log dirs written to (for tests / inspection)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            if not hasattr(writer, "add_custom_scalars"):
                continue
            writer.add_custom_scalars(self.layout or clip_fraction_layout())
            writer.flush()
            self.written.append(logger.log_dir)
