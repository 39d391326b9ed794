"""``rlopt-report``: tables and plots from the TensorBoard logs of a sweep (or any folder of runs).

    rlopt-report multirun/grpo_vs_gspo/2026-11-27_10-00-00_quick      # writes <dir>/report/
    rlopt-report <dir> --out docs/sweep --last 10 --smooth 5
    python -m rlopt.report <dir>

Every folder under ``<dir>`` holding TensorBoard event files is one run, named by its path
relative to ``<dir>`` (in a sweep: the run's overrides, e.g. ``algorithm=gspo,seed=1``). Its
*configuration* is that name with the ``seed=...`` override removed, so the seeds of one
configuration are aggregated. Runs that failed in a multirun left ``FAILED.txt`` (a traceback)
in their output folder; they are listed with the first and last line of it.

Written to ``--out`` (default ``<dir>/report``):

- ``report.md``: the per-run and per-configuration tables, the failed runs and the plots;
- ``runs.csv``: one row per run: ``final_reward`` (mean of ``reward/mean`` over the last
  ``--last`` steps), ``best_reward`` (the best such ``--last``-step mean at any point),
  ``clip_token_{low,high,region}`` / ``clip_seq_{low,high,region}`` (clip fractions, mean over
  all steps), ``kl``, ``entropy``, ``tokens_per_s`` (means over all steps), ``steps``, ``status``;
- ``configs.csv``: one row per configuration: ``<metric>_mean`` and ``<metric>_std`` (sample
  std over seeds; empty for one seed), ``n_runs``, ``n_failed``;
- ``reward.png``: reward over steps, one line per configuration (mean over seeds, band: std);
- ``clip_fractions.png``: token and sequence clip fractions (low / high / region) over steps,
  one line per configuration (mean over seeds).

The same steps from Python (e.g. a notebook)::

    from rlopt.report import load_runs, load_failures, summarize, aggregate, plot
    df = load_runs(root)                 # long table: run, config, seed, tag, step, value, wall_time
    runs = summarize(df, load_failures(root))
    configs = aggregate(runs)
    plot(df, "out/")                     # {"reward": "out/reward.png", "clip_fractions": ...}
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .algorithms.clipping import CLIP_MAIN_FLAGS

CLIP_LEVELS = (("token", "token"), ("seq", "sequence"))  # tag prefix, label
#: per-run metric -> (TensorBoard tag, how it is reduced over steps)
STEP_MEANS = {
    **{f"clip_{p}_{k}": f"clip/{p}_{k}" for p, _ in CLIP_LEVELS for k in CLIP_MAIN_FLAGS},
    "kl": "kl/mean",
    "entropy": "entropy/mean",
    "tokens_per_s": "perf/tokens_per_s",
}
REWARD_TAG = "reward/mean"
METRICS = ("final_reward", "best_reward", *STEP_MEANS)
RUN_COLUMNS = ("run", "config", "seed", "status", "steps", *METRICS)
FAILURE_COLUMNS = ("run", "config", "seed", "folder", "first_line", "last_line")
_SEED = re.compile(r"^\+{0,2}seed=(.*)$")


# ------------------------------------------------------------------------------------ run names
def split_overrides(name: str) -> list[str]:
    """``"a=1,b=[2,3]"`` -> ``["a=1", "b=[2,3]"]`` (commas inside brackets or quotes are kept)."""
    items, depth, quote, cur = [], 0, "", []
    for ch in name:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [i for i in items if i]


def parse_overrides(name: str) -> dict[str, str]:
    """``"algorithm=gspo,seed=1"`` -> ``{"algorithm": "gspo", "seed": "1"}``."""
    out = {}
    for item in split_overrides(name):
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def config_name(run: str) -> str:
    """The run name without its ``seed=...`` override (``"default"`` if nothing is left)."""
    prefix, _, base = run.rstrip("/").rpartition("/")
    name = ",".join(i for i in split_overrides(base) if not _SEED.match(i)) or "default"
    return f"{prefix}/{name}" if prefix else name


def run_seed(run: str) -> float:
    """The ``seed=...`` override of a run name as a number (NaN if absent or not a number)."""
    for item in split_overrides(run.rstrip("/").rpartition("/")[2]):
        m = _SEED.match(item)
        if m:
            try:
                return float(m.group(1))
            except ValueError:
                return math.nan
    return math.nan


def short_labels(names: Iterable[str]) -> dict[str, str]:
    """Legend labels: each name without the overrides that all names share."""
    names = list(dict.fromkeys(names))
    parts = {n: split_overrides(n) for n in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(names) > 1 else set()
    return {n: ",".join(i for i in parts[n] if i not in common) or n for n in names}


# ------------------------------------------------------------------------------------ loading
def load_runs(root: str | os.PathLike) -> pd.DataFrame:
    """All scalars under ``root``: one row per (run, tag, step) with columns
    ``run, config, seed, tag, step, value, wall_time`` (the last write of a step wins)."""
    from tbparse import SummaryReader

    cols = ["run", "config", "seed", "tag", "step", "value", "wall_time"]
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    if not any(root.rglob("events.out.tfevents.*")):
        return pd.DataFrame(columns=cols)
    with warnings.catch_warnings():  # tbparse's own pandas deprecation warnings
        warnings.simplefilter("ignore", category=Warning)
        df = SummaryReader(str(root), pivot=False, extra_columns={"dir_name", "wall_time"}).scalars
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.rename(columns={"dir_name": "run"})
    df["run"] = df["run"].astype(str).replace("", root.resolve().name)
    df = (df.sort_values(["run", "tag", "step", "wall_time"])
            .drop_duplicates(["run", "tag", "step"], keep="last"))
    df["config"] = df["run"].map(config_name)
    df["seed"] = df["run"].map(run_seed)
    df["step"] = df["step"].astype(int)
    df["value"] = df["value"].astype(float)
    return df[cols].reset_index(drop=True)


def _rel(path: Path, root: Path) -> str:
    rel = os.path.relpath(path.resolve(), root.resolve()).replace(os.sep, "/")
    return rel if rel != "." else root.resolve().name


def _name_of_failed(folder: Path, root: Path) -> str:
    """The name :func:`load_runs` gives the run of output folder ``folder``: the path under
    ``root`` of its TensorBoard folder ``<log_root>/<run name>``, where the run name is
    ``hydra.job.override_dirname`` (as rlopt-train names it) and ``log_root`` the sweep folder
    (``folder``'s parent) or, for a single run, ``folder`` itself. Without ``.hydra/hydra.yaml``:
    the folder's own path under ``root``."""
    hydra_yaml = folder / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        from omegaconf import OmegaConf

        from .conf import _run_name

        try:
            cfg = OmegaConf.load(hydra_yaml)
            name = _run_name(OmegaConf.select(cfg, "hydra.job.override_dirname", default=""))
        except Exception:  # noqa: BLE001 - an unreadable hydra.yaml: fall back to the folder
            name = None
        if name is not None:
            for log_root in (folder.parent, folder):
                if (log_root / name).is_dir():
                    return _rel(log_root / name, root)
            return _rel(folder.parent / name, root) if folder.resolve() != root.resolve() else name
    return _rel(folder, root)


def load_failures(root: str | os.PathLike) -> pd.DataFrame:
    """Runs that left ``FAILED.txt`` under ``root``: ``run, config, seed, folder, first_line,
    last_line`` (the first and last non-empty line of the traceback)."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("FAILED.txt")):
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        run = _name_of_failed(path.parent, root)
        rows.append({"run": run, "config": config_name(run), "seed": run_seed(run),
                     "folder": os.path.relpath(path.parent, root),
                     "first_line": lines[0] if lines else "", "last_line": lines[-1] if lines else ""})
    return pd.DataFrame(rows, columns=list(FAILURE_COLUMNS))


def load_run_info(root: str | os.PathLike, keys: Sequence[str] = ("algorithm_name", "num_minibatches", "ppo_epochs")
                  ) -> pd.DataFrame:
    """One row per run output folder under ``root`` (a folder with ``.hydra/config.yaml``; in a
    sweep ``<sweep dir>/<job number>/``): ``run`` (its TensorBoard run name), ``folder``,
    ``failed`` and the config values ``keys`` (dotted paths; None where missing/unresolvable)."""
    from omegaconf import OmegaConf

    root = Path(root)
    rows = []
    for cfg_path in sorted(root.rglob(".hydra/config.yaml")):
        folder = cfg_path.parent.parent
        row: dict[str, Any] = {"run": _name_of_failed(folder, root), "folder": os.path.relpath(folder, root),
                               "failed": (folder / "FAILED.txt").is_file()}
        try:
            cfg = OmegaConf.load(cfg_path)
        except Exception:  # noqa: BLE001 - unreadable: keys stay None
            cfg = OmegaConf.create()
        for k in keys:
            try:
                row[k] = OmegaConf.select(cfg, k, default=None, throw_on_resolution_failure=False)
            except Exception:  # noqa: BLE001
                row[k] = None
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "folder", "failed", *keys])


# ------------------------------------------------------------------------------------ tables
def _series(df: pd.DataFrame, tag: str) -> pd.Series:
    s = df[df["tag"] == tag]
    return s.set_index("step")["value"].sort_index()


def summarize(df: pd.DataFrame, failures: pd.DataFrame | None = None, last: int = 10) -> pd.DataFrame:
    """One row per run (columns ``RUN_COLUMNS``). ``failures`` (from :func:`load_failures`) marks
    runs ``status="failed"``; a failed run without logs still gets a row (metrics NaN)."""
    failed = set() if failures is None or failures.empty else set(failures["run"])
    rows = []
    for run, g in df.groupby("run", sort=True):
        reward = _series(g, REWARD_TAG)
        row: dict[str, Any] = {"run": run, "config": config_name(run), "seed": run_seed(run),
                               "status": "failed" if run in failed else "ok",
                               "steps": int(reward.index.max()) + 1 if len(reward) else 0}
        if len(reward):
            k = min(int(last), len(reward))
            row["final_reward"] = float(reward.iloc[-k:].mean())
            row["best_reward"] = float(reward.rolling(k).mean().max())
        for name, tag in STEP_MEANS.items():
            s = _series(g, tag)
            row[name] = float(s.mean()) if len(s) else math.nan
        rows.append(row)
    seen = {r["run"] for r in rows}
    if failures is not None:
        for f in failures.itertuples():
            if f.run not in seen:
                seen.add(f.run)
                rows.append({"run": f.run, "config": f.config, "seed": f.seed, "status": "failed", "steps": 0})
    out = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    out[list(METRICS)] = out[list(METRICS)].astype(float)
    return out.sort_values(["config", "seed", "run"]).reset_index(drop=True)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: ``n_runs`` (successful), ``n_failed``, and ``<metric>_mean`` /
    ``<metric>_std`` over its successful runs (seeds); std is the sample std (NaN for one run)."""
    rows = []
    for cfg, g in runs.groupby("config", sort=True):
        ok = g[g["status"] == "ok"]
        row: dict[str, Any] = {"config": cfg, "n_runs": len(ok), "n_failed": int((g["status"] != "ok").sum())}
        for m in METRICS:
            v = ok[m].dropna()
            row[f"{m}_mean"] = float(v.mean()) if len(v) else math.nan
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        rows.append(row)
    cols = ["config", "n_runs", "n_failed"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    return pd.DataFrame(rows, columns=cols)


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def configs_markdown(configs: pd.DataFrame, digits: int = 4) -> str:
    """The per-configuration table with ``mean ± std`` cells."""
    out = configs[["config", "n_runs", "n_failed"]].copy()
    for m in METRICS:
        out[m] = [_fmt(a, digits) + ("" if math.isnan(s) else f" ± {_fmt(s, 2)}")
                  for a, s in zip(configs[f"{m}_mean"], configs[f"{m}_std"])]
    return markdown_table(out, digits)


# ------------------------------------------------------------------------------------ curves / plots
def curves(df: pd.DataFrame, tag: str, smooth: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(mean, std)`` over seeds of ``tag`` per step, one column per configuration; each run's
    curve is first smoothed with a trailing ``smooth``-step rolling mean."""
    d = df[df["tag"] == tag]
    if d.empty:
        return pd.DataFrame(), pd.DataFrame()
    per_run = d.pivot_table(index="step", columns="run", values="value", aggfunc="last").sort_index()
    per_run = per_run.rolling(max(1, int(smooth)), min_periods=1).mean()
    cfg = {r: config_name(r) for r in per_run.columns}
    grouped = per_run.T.groupby(pd.Series(cfg))
    return grouped.mean().T, grouped.std(ddof=1).T


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


def plot_reward(df: pd.DataFrame, smooth: int | None = None, tag: str = REWARD_TAG):
    """Reward over steps, one line per configuration (mean over seeds, band: +-1 std)."""
    smooth = _default_smooth(df) if smooth is None else smooth
    mean, std = curves(df, tag, smooth)
    fig, axes = _figure(1, 1, (8, 4.5))
    ax = axes[0, 0]
    labels = short_labels(mean.columns)
    for c in mean.columns:
        line, = ax.plot(mean.index, mean[c], label=labels[c])
        if c in std and std[c].notna().any():
            ax.fill_between(mean.index, mean[c] - std[c], mean[c] + std[c], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel=tag, title=f"{tag} (mean over seeds, band ±1 std; {smooth}-step rolling mean)")
    ax.grid(alpha=0.3)
    if len(mean.columns):
        ax.legend(fontsize="small")
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
    """Write ``reward.png`` and ``clip_fractions.png`` into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, fig in (("reward", plot_reward(df, smooth)), ("clip_fractions", plot_clip_fractions(df, smooth))):
        paths[name] = os.path.join(out_dir, f"{name}.png")
        fig.savefig(paths[name], dpi=dpi)
    return paths


# ------------------------------------------------------------------------------------ report
def write_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, last: int = 10,
                 smooth: int | None = None) -> dict[str, Any]:
    """Load, summarise, aggregate and plot the runs under ``root``; write the files listed in
    the module docstring into ``out_dir`` (default ``<root>/report``). Returns the tables and paths."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / "report"
    df = load_runs(root)
    failures = load_failures(root)
    runs = summarize(df, failures, last=last)
    configs = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs_csv": str(out / "runs.csv"), "configs_csv": str(out / "configs.csv"),
             "markdown": str(out / "report.md")}
    runs.to_csv(paths["runs_csv"], index=False)
    configs.to_csv(paths["configs_csv"], index=False)
    if not df.empty:
        paths.update(plot(df, out, smooth))
    md = [f"# Sweep report: `{root}`", "",
          f"{len(runs)} runs ({int((runs['status'] == 'failed').sum())} failed), {len(configs)} configurations. "
          f"final_reward: mean reward of the last {last} steps; best_reward: the best {last}-step mean; "
          "clip fractions, kl, entropy, tokens_per_s: means over all steps.", "",
          "## Per configuration (mean ± std over seeds)", "", configs_markdown(configs), "",
          "## Per run", "", markdown_table(runs), ""]
    if not failures.empty:
        md += ["## Failed runs", "", markdown_table(failures[["run", "folder", "first_line", "last_line"]]), ""]
    for name in ("reward", "clip_fractions"):
        if name in paths:
            md += [f"![{name}]({name}.png)", ""]
    Path(paths["markdown"]).write_text("\n".join(md))
    return {"runs": runs, "configs": configs, "failures": failures, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlopt-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a sweep folder (or any folder of TensorBoard runs)")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/report)")
    parser.add_argument("--last", type=int, default=10, help="steps averaged for final_reward (default 10)")
    parser.add_argument("--smooth", type=int, default=None,
                        help="rolling-mean window of the plotted curves (default: steps // 20, at least 1)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    if not os.path.isdir(args.root):
        parser.error(f"no such folder: {args.root}")
    res = write_report(args.root, args.out, last=args.last, smooth=args.smooth)
    if res["runs"].empty:
        print(f"[rlopt-report] no TensorBoard runs and no FAILED.txt under {args.root}", file=sys.stderr)
        return 1
    print(configs_markdown(res["configs"]))
    for f in res["failures"].itertuples():
        print(f"[rlopt-report] FAILED {f.run} ({f.folder}): {f.first_line} ... {f.last_line}")
    for name, path in res["paths"].items():
        print(f"[rlopt-report] {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
