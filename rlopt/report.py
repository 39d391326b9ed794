"""``rlopt-report``: tables, statistics and plots from the TensorBoard logs of a sweep (or any folder of runs).

    rlopt-report multirun/grpo_vs_gspo/2026-11-27_10-00-00_quick      # writes <dir>/report/
    rlopt-report <dir> --out docs/sweep --last 10 --smooth 5 --eval-last 3 --metric val_accuracy_greedy
    python -m rlopt.report <dir>

Every folder under ``<dir>`` holding TensorBoard event files is one run, named by its path
relative to ``<dir>`` (in a sweep: the run's overrides, e.g. ``algorithm=gspo,seed=1``). Its
*configuration* is that name with the ``seed=...`` override removed, so the seeds of one
configuration are aggregated. Runs that failed in a multirun left ``FAILED.txt`` (a traceback)
in their output folder; they are listed with the first and last line of it. A run's saved Hydra
config (``<output folder>/.hydra/config.yaml``) gives its components.

Written to ``--out`` (default ``<dir>/report``):

- ``report.md``: the tables below, the failed runs and the plots;
- ``runs.csv``: one row per run: ``final_reward`` (mean of ``reward/mean`` over the last
  ``--last`` steps), ``best_reward`` (the best such ``--last``-step mean at any point),
  ``val_{reward,accuracy}_{greedy,sampled}`` (held-out evaluation: mean of the last
  ``--eval-last`` evaluations), ``evals`` (evaluations logged),
  ``clip_token_{low,high,region}`` / ``clip_seq_{low,high,region}`` (clip fractions, mean over
  all steps), ``kl``, ``entropy``, ``tokens_per_s`` (means over all steps), ``steps``, ``status``;
- ``configs.csv``: one row per configuration: ``<metric>_mean`` and ``<metric>_std`` (sample
  std over seeds; empty for one seed), ``n_runs``, ``n_failed``;
- ``stats.csv``: per configuration, the *score* (``--metric``; default the first logged of
  ``val_reward_greedy``, ``val_accuracy_greedy``, ``final_reward``): mean and IQM with 95 %
  stratified-bootstrap intervals (``rlopt.stats``; strata: tasks when the runs span several);
- ``pairs.csv``: every pair of configurations: difference with its 95 % interval, ``resolved``,
  probability of improvement, seeds needed per arm, and the axes the pair changes;
- ``components.csv``: per configuration, its advantage / ratio / clip / aggregation / kl /
  entropy and every other setting on which configurations differ;
- ``reward.png`` (reward over steps), ``eval.png`` (held-out evaluations over steps): one line
  per configuration, the mean over seeds with its 95 % t-interval band; ``clip_fractions.png``:
  token and sequence clip fractions (low / high / region) over steps (mean over seeds).

The statistics and how to read them: ``docs/experiments.md``. The same steps from Python::

    from rlopt.report import load_runs, load_failures, summarize, aggregate, compare_configs, plot
    df = load_runs(root)                 # long table: run, config, seed, tag, step, value, wall_time
    runs = summarize(df, load_failures(root))
    configs = aggregate(runs)
    st = compare_configs(runs, load_run_configs(root))   # intervals, pairs, settings, warnings
    plot(df, "out/")                     # {"reward": "out/reward.png", "eval": ..., "clip_fractions": ...}
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import stats
from .algorithms.clipping import CLIP_MAIN_FLAGS
from .report_plots import (  # noqa: F401 - re-exported: rlopt.report.plot etc.
    CLIP_LEVELS, REWARD_TAG, VAL_TAGS, curve_bands, curves, plot, plot_clip_fractions, plot_eval, plot_reward,
)
from .report_tables import VAL_METRICS, _fmt, compare_configs, markdown_table, stats_text  # noqa: F401
from .runnames import (  # noqa: F401 - re-exported: rlopt.report.config_name etc.
    _SEED, config_name, parse_overrides, run_seed, short_labels, split_overrides, without_keys,
)

#: per-run metric -> (TensorBoard tag, how it is reduced over steps)
STEP_MEANS = {
    **{f"clip_{p}_{k}": f"clip/{p}_{k}" for p, _ in CLIP_LEVELS for k in CLIP_MAIN_FLAGS},
    "kl": "kl/mean",
    "entropy": "entropy/mean",
    "tokens_per_s": "perf/tokens_per_s",
    # the sampler mismatch, the behaviour correction, lengths and staleness (NaN where not logged)
    "mismatch_kl_k3": "mismatch/kl_k3",
    "mismatch_logp_abs_diff_max": "mismatch/logp_abs_diff_max",
    "correction_weight_mean": "correction/weight_mean",
    "correction_token_frac_high": "correction/token_frac_high",
    "correction_ess_token": "correction/ess_token",
    "length_incorrect": "completion/length_incorrect",
    "length_correct": "completion/length_correct",
    "staleness": "offpolicy/staleness_mean",
}
#: per-run held-out score -> its tag (mean of the last ``eval_last`` evaluations)
SCORE_PREFERENCE = ("val_reward_greedy", "val_accuracy_greedy", "final_reward")
METRICS = ("final_reward", "best_reward", *VAL_METRICS, *STEP_MEANS)
RUN_COLUMNS = ("run", "config", "seed", "status", "steps", "evals", *METRICS)
FAILURE_COLUMNS = ("run", "config", "seed", "folder", "first_line", "last_line")


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


def _plain(node: Any) -> Any:
    """A loaded config as dicts / lists, each interpolation resolved where it can be (``${clip_eps}``)
    and kept as its text where it cannot; ``${hydra:...}`` always stays text (resolving it would read
    the state of whatever Hydra app is running now, not the run's)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, (DictConfig, ListConfig)):
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        out = {}
        for k in keys:
            raw = node._get_node(k)._value()
            if isinstance(raw, str) and "${hydra:" in raw:  # the run's Hydra state, not this process's
                out[k] = raw
                continue
            try:
                v = node[k]
            except Exception:  # noqa: BLE001 - unresolvable or missing (???): its text
                v = str(raw)
            out[k] = _plain(v)
        return out if isinstance(node, DictConfig) else list(out.values())
    return node


def load_run_configs(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{run name: {"config": dict, "task": str | None, "refs": set}}`` for every run output
    folder under ``root`` with ``.hydra/config.yaml`` (the first folder of a name wins): the saved
    config (:func:`_plain`), the task group chosen (``.hydra/hydra.yaml``:
    ``hydra.runtime.choices.task``) and the keys that the algorithm axes interpolate
    (``clip.eps_low: ${clip_eps}`` -> ``clip_eps``: a change of it is counted as a change of clip)."""
    from omegaconf import OmegaConf

    root, out = Path(root), {}
    for cfg_path in sorted(root.rglob(".hydra/config.yaml")):
        folder = cfg_path.parent.parent
        run = _name_of_failed(folder, root)
        if run in out:
            continue
        try:
            cfg = OmegaConf.load(cfg_path)
            raw = OmegaConf.to_container(cfg, resolve=False)
        except Exception:  # noqa: BLE001 - unreadable: no components for this run
            continue
        task = None
        try:
            task = OmegaConf.select(OmegaConf.load(folder / ".hydra" / "hydra.yaml"), "hydra.runtime.choices.task")
        except Exception:  # noqa: BLE001 - no hydra.yaml: the task is unknown
            pass
        refs = set(re.findall(r"\$\{([A-Za-z_][\w.]*)\}", str([raw.get(k) for k in (*stats.AXES, "loss")])))
        out[run] = {"config": _plain(cfg), "task": task, "refs": refs}
    return out


# ------------------------------------------------------------------------------------ tables
def _series(df: pd.DataFrame, tag: str) -> pd.Series:
    s = df[df["tag"] == tag]
    return s.set_index("step")["value"].sort_index()


def summarize(df: pd.DataFrame, failures: pd.DataFrame | None = None, last: int = 10,
              eval_last: int = 3) -> pd.DataFrame:
    """One row per run (columns ``RUN_COLUMNS``). ``failures`` (from :func:`load_failures`) marks
    runs ``status="failed"``; a failed run without logs still gets a row (metrics NaN). The
    ``val_*`` scores are the mean of the last ``eval_last`` held-out evaluations."""
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
        for name, tag in VAL_METRICS.items():
            s = _series(g, tag)
            row[name] = float(s.iloc[-max(1, int(eval_last)):].mean()) if len(s) else math.nan
        row["evals"] = len(_series(g, VAL_TAGS[0]))
        for name, tag in STEP_MEANS.items():
            s = _series(g, tag)
            row[name] = float(s.mean()) if len(s) else math.nan
        rows.append(row)
    seen = {r["run"] for r in rows}
    if failures is not None:
        for f in failures.itertuples():
            if f.run not in seen:
                seen.add(f.run)
                rows.append({"run": f.run, "config": f.config, "seed": f.seed, "status": "failed", "steps": 0,
                             "evals": 0})
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


def configs_markdown(configs: pd.DataFrame, digits: int = 4) -> str:
    """The per-configuration table with ``mean ± std`` cells."""
    out = configs[["config", "n_runs", "n_failed"]].copy()
    for m in METRICS:
        out[m] = [_fmt(a, digits) + ("" if math.isnan(s) else f" ± {_fmt(s, 2)}")
                  for a, s in zip(configs[f"{m}_mean"], configs[f"{m}_std"])]
    return markdown_table(out, digits)


# ------------------------------------------------------------------------------------ statistics
def score_metric(runs: pd.DataFrame, metric: str = "auto") -> str:
    """``metric``, or for ``"auto"`` the first of ``SCORE_PREFERENCE`` that a finished run logged."""
    if metric != "auto":
        if metric not in runs:
            raise ValueError(f"--metric {metric!r} is not a run metric; valid choices: {', '.join(METRICS)}")
        return metric
    ok = runs[runs["status"] == "ok"]
    return next((m for m in SCORE_PREFERENCE if ok[m].notna().any()), SCORE_PREFERENCE[-1])


# ------------------------------------------------------------------------------------ report
def write_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, last: int = 10,
                 smooth: int | None = None, eval_last: int = 3, metric: str = "auto", **stats_kw: Any
                 ) -> dict[str, Any]:
    """Load, summarise, aggregate, compare and plot the runs under ``root``; write the files
    listed in the module docstring into ``out_dir`` (default ``<root>/report``). ``stats_kw``
    (confidence, n_resamples, method, seed) go to ``rlopt.stats``. Returns the tables, the
    statistics (``stats``: :func:`compare_configs`) and the paths."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / "report"
    df = load_runs(root)
    failures = load_failures(root)
    runs = summarize(df, failures, last=last, eval_last=eval_last)
    configs = aggregate(runs)
    st = compare_configs(runs, load_run_configs(root), score_metric(runs, metric), **stats_kw)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / f"{name}.csv") for name in ("runs", "configs", "stats", "pairs", "components")}
    paths["markdown"] = str(out / "report.md")
    runs.to_csv(paths["runs"], index=False)
    configs.to_csv(paths["configs"], index=False)
    st["intervals"].to_csv(paths["stats"], index=False)
    st["pairs"].to_csv(paths["pairs"], index=False)
    pd.DataFrame.from_dict(st["settings"], orient="index").rename_axis("config").to_csv(paths["components"])
    if not df.empty:
        paths.update(plot(df, out, smooth))
    md = [f"# Sweep report: `{root}`", "",
          f"{len(runs)} runs ({int((runs['status'] == 'failed').sum())} failed), {len(configs)} configurations. "
          f"final_reward: mean reward of the last {last} steps; best_reward: the best {last}-step mean; "
          f"val_*: mean of the last {eval_last} held-out evaluations; "
          "clip fractions, kl, entropy, tokens_per_s: means over all steps.", "",
          "## Statistics (see docs/experiments.md)", "",
          *stats_text(st, eval_last, stats_kw.get("method", stats.METHOD)),
          "## Per configuration (mean ± std over seeds)", "", configs_markdown(configs), "",
          "## Per run", "", markdown_table(runs), ""]
    if not failures.empty:
        md += ["## Failed runs", "", markdown_table(failures[["run", "folder", "first_line", "last_line"]]), ""]
    for name in ("reward", "eval", "clip_fractions"):
        if name in paths:
            md += [f"![{name}]({name}.png)", ""]
    Path(paths["markdown"]).write_text("\n".join(md))
    return {"runs": runs, "configs": configs, "failures": failures, "stats": st, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlopt-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a sweep folder (or any folder of TensorBoard runs)")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/report)")
    parser.add_argument("--last", type=int, default=10, help="steps averaged for final_reward (default 10)")
    parser.add_argument("--smooth", type=int, default=None,
                        help="rolling-mean window of the plotted curves (default: steps // 20, at least 1)")
    parser.add_argument("--eval-last", type=int, default=3,
                        help="held-out evaluations averaged into a run's val_* score (default 3)")
    parser.add_argument("--metric", default="auto", help="the per-run score compared: a runs.csv column "
                        f"(default auto: the first logged of {', '.join(SCORE_PREFERENCE)})")
    parser.add_argument("--resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap resamples (default 9999)")
    parser.add_argument("--ci-method", default=stats.METHOD, choices=("percentile", "basic", "BCa"),
                        help="scipy.stats.bootstrap method (default percentile)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    if not os.path.isdir(args.root):
        parser.error(f"no such folder: {args.root}")
    try:
        res = write_report(args.root, args.out, last=args.last, smooth=args.smooth, eval_last=args.eval_last,
                           metric=args.metric, n_resamples=args.resamples, method=args.ci_method, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    if res["runs"].empty:
        print(f"[rlopt-report] no TensorBoard runs and no FAILED.txt under {args.root}", file=sys.stderr)
        return 1
    print(configs_markdown(res["configs"]))
    print()
    print("\n".join(stats_text(res["stats"], args.eval_last, args.ci_method)))
    for f in res["failures"].itertuples():
        print(f"[rlopt-report] FAILED {f.run} ({f.folder}): {f.first_line} ... {f.last_line}")
    for name, path in res["paths"].items():
        print(f"[rlopt-report] {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
