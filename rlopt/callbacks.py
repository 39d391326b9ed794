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
        "sampler mismatch, behaviour correction, token masks": {
            "mismatch KL (k1, k3)": ["Multiline", [_tag("mismatch/kl_k1"), _tag("mismatch/kl_k3")]],
            "mismatch |log pi_old - log mu| (mean, max)": ["Multiline", [_tag("mismatch/logp_abs_diff_mean"),
                                                                         _tag("mismatch/logp_abs_diff_max")]],
            "mismatch chi2 (token, sequence)": ["Multiline", [_tag("mismatch/chi2_token"), _tag("mismatch/chi2_seq")]],
            "mismatch perplexity ratio": ["Multiline", [_tag("mismatch/ppl_ratio")]],
            "correction weight mean [min, max]": ["Margin", [_tag("correction/weight_mean"), _tag("correction/weight_min"),
                                                            _tag("correction/weight_max")]],
            "correction ESS (token, sequence)": ["Multiline", [_tag("correction/ess_token"), _tag("correction/ess_seq")]],
            "correction truncated / masked (token)": ["Multiline", [_tag("correction/token_frac_high"),
                                                                    _tag("correction/token_frac_low"),
                                                                    _tag("correction/token_masked")]],
            "token masks: fraction masked": ["Multiline", [r"^mask/.*_frac$"]],
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
