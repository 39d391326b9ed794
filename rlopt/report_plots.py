"""The plots of ``rlopt-report`` (re-exported by ``rlopt.report``): learning curves with 95 %
t-interval bands of the mean over seeds, clip fractions, held-out evaluation curves."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from .algorithms.clipping import CLIP_MAIN_FLAGS
from .runnames import config_name, short_labels
from .stats import CONFIDENCE, mean_interval

CLIP_LEVELS = (("token", "token"), ("seq", "sequence"))  # tag prefix, label
REWARD_TAG = "reward/mean"
VAL_TAGS = ("val/reward_greedy", "val/accuracy_greedy", "val/reward_sampled", "val/accuracy_sampled")


def _per_run(df: pd.DataFrame, tag: str, smooth: int) -> pd.DataFrame:
    d = df[df["tag"] == tag]
    if d.empty:
        return pd.DataFrame()
    per_run = d.pivot_table(index="step", columns="run", values="value", aggfunc="last").sort_index()
    return per_run.rolling(max(1, int(smooth)), min_periods=1).mean()


def curves(df: pd.DataFrame, tag: str, smooth: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(mean, std)`` over seeds of ``tag`` per step, one column per configuration; each run's
    curve is first smoothed with a trailing ``smooth``-step rolling mean."""
    per_run = _per_run(df, tag, smooth)
    if per_run.empty:
        return pd.DataFrame(), pd.DataFrame()
    grouped = per_run.T.groupby(pd.Series({r: config_name(r) for r in per_run.columns}))
    return grouped.mean().T, grouped.std(ddof=1).T


def curve_bands(df: pd.DataFrame, tag: str, smooth: int = 1, confidence: float = CONFIDENCE
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(mean, lo, hi)`` per step and configuration: the mean over seeds of ``tag`` (each run
    smoothed as in :func:`curves`) and its ``confidence`` t interval (``stats.mean_interval``;
    NaN with fewer than 2 seeds at a step)."""
    per_run = _per_run(df, tag, smooth)
    if per_run.empty:
        return pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    cfg = pd.Series({r: config_name(r) for r in per_run.columns})
    out: list[dict[str, Any]] = [{}, {}, {}]
    for c, runs in cfg.groupby(cfg, sort=True):
        for d, arr in zip(out, mean_interval(per_run[list(runs.index)].to_numpy(), axis=1, confidence=confidence)):
            d[c] = arr
    return tuple(pd.DataFrame(d, index=per_run.index) for d in out)  # type: ignore[return-value]


def _default_smooth(df: pd.DataFrame) -> int:
    steps = int(df["step"].max()) + 1 if len(df) else 1
    return max(1, steps // 20)


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _set_scale(ax, mean: pd.DataFrame) -> None:
    pos = mean.to_numpy()[np.isfinite(mean.to_numpy()) & (mean.to_numpy() > 0)]
    if len(pos) and pos.max() / pos.min() > 30:  # fractions spanning > 1.5 decades: log axis
        ax.set_yscale("log")


def _band_panel(ax, df: pd.DataFrame, tag: str, smooth: int, marker: str | None = None) -> bool:
    mean, lo, hi = curve_bands(df, tag, smooth)
    labels = short_labels(mean.columns)
    for c in mean.columns:
        m = mean[c].dropna()
        line, = ax.plot(m.index, m, label=labels[c], marker=marker)
        ok = lo[c].notna() & hi[c].notna()
        if ok.any():
            ax.fill_between(mean.index[ok], lo[c][ok], hi[c][ok], color=line.get_color(), alpha=0.15)
    ax.grid(alpha=0.3)
    if len(mean.columns):
        ax.legend(fontsize="small")
    return not mean.empty


def plot_reward(df: pd.DataFrame, smooth: int | None = None, tag: str = REWARD_TAG):
    """Reward over steps, one line per configuration: the mean over seeds, band: its 95 % t interval."""
    smooth = _default_smooth(df) if smooth is None else smooth
    fig, axes = _figure(1, 1, (8, 4.5))
    _band_panel(axes[0, 0], df, tag, smooth)
    axes[0, 0].set(xlabel="step", ylabel=tag,
                   title=f"{tag} (mean over seeds, band: 95% t interval of the mean; {smooth}-step rolling mean)")
    return fig


def plot_eval(df: pd.DataFrame, tags: tuple[str, ...] = VAL_TAGS):
    """Held-out evaluations (``val/*``) over steps, one panel per logged tag, one line per
    configuration: the mean over seeds with its 95 % t interval (no smoothing). None if no
    ``val/*`` tag was logged."""
    present = [t for t in tags if (df["tag"] == t).any()]
    if not present:
        return None
    fig, axes = _figure(1, len(present), (6 * len(present), 4.5))
    for ax, tag in zip(axes[0], present):
        _band_panel(ax, df, tag, 1, marker=".")
        ax.set(xlabel="step", ylabel=tag, title=f"{tag} (mean over seeds, band: 95% t interval)")
    return fig


def plot_clip_fractions(df: pd.DataFrame, smooth: int | None = None):
    """Token (top) and sequence (bottom) clip fractions low / high / region over steps, one line
    per configuration (mean over seeds). A panel whose values span > 1.5 decades is log-scaled."""
    smooth = _default_smooth(df) if smooth is None else smooth
    fig, axes = _figure(2, 3, (14, 7))
    handles: dict[str, Any] = {}
    for i, (prefix, level) in enumerate(CLIP_LEVELS):
        for j, kind in enumerate(CLIP_MAIN_FLAGS):
            ax = axes[i, j]
            tag = f"clip/{prefix}_{kind}"
            mean, _ = curves(df, tag, smooth)
            labels = short_labels(mean.columns)
            for c in mean.columns:
                handles[labels[c]], = ax.plot(mean.index, mean[c], label=labels[c])
            if not mean.empty:
                _set_scale(ax, mean)
            ax.set(title=f"{level} clip fraction: {kind}", xlabel="step", ylabel=tag)
            ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(4, len(handles)), fontsize="small")
    fig.suptitle(f"clip fractions (mean over seeds; {smooth}-step rolling mean)")
    return fig


def plot(df: pd.DataFrame, out_dir: str | os.PathLike, smooth: int | None = None, dpi: int = 110) -> dict[str, str]:
    """Write ``reward.png``, ``clip_fractions.png`` and (if ``val/*`` was logged) ``eval.png``
    into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    figs = (("reward", plot_reward(df, smooth)), ("eval", plot_eval(df)),
            ("clip_fractions", plot_clip_fractions(df, smooth)))
    for name, fig in figs:
        if fig is not None:
            paths[name] = os.path.join(out_dir, f"{name}.png")
            fig.savefig(paths[name], dpi=dpi)
    return paths
