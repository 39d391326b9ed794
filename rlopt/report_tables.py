"""Markdown tables of ``rlopt-report`` (re-exported by ``rlopt.report``) and its statistics
section: :func:`compare_configs` runs ``rlopt.stats`` over the finished runs of a report and
names the axes each pair of configurations changes; :func:`stats_text` prints it."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import stats
from .report_plots import VAL_TAGS
from .runnames import parse_overrides, short_labels, split_overrides, without_keys

VAL_METRICS = {t.replace("/", "_"): t for t in VAL_TAGS}  # val_reward_greedy -> val/reward_greedy


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


def compare_configs(runs: pd.DataFrame, run_configs: dict[str, dict[str, Any]] | None = None,
                    metric: str = "final_reward", **kw: Any) -> dict[str, Any]:
    """The statistics of ``rlopt.stats`` over the finished runs' ``metric`` (a column of
    ``runs``, from ``rlopt.report.summarize``; ``run_configs`` from
    ``rlopt.report.load_run_configs``; ``kw``: confidence,
    n_resamples, method, seed). When the runs span several tasks (a ``task=`` override, else
    the task group in ``.hydra/hydra.yaml``), a configuration is its name without ``task=`` and
    the intervals are stratified over tasks. Returns ``metric``, ``scores`` (one row per run),
    ``intervals``, ``pairs`` (with ``changes``: the axes a pair changes), ``settings``
    (``{config: {axis: text}}``), ``varying`` (the axes that differ) and ``warnings``."""
    run_configs = run_configs or {}
    ok = runs[runs["status"] == "ok"]
    task = [parse_overrides(r.rpartition("/")[2]).get("task") or (run_configs.get(r) or {}).get("task") or ""
            for r in ok["run"]]
    scores = pd.DataFrame({"run": ok["run"].to_numpy(), "config": ok["config"].to_numpy(), "task": task,
                           "seed": ok["seed"].to_numpy(), "score": ok[metric].to_numpy(float)})
    stratified = scores["task"].nunique() > 1
    if stratified:
        scores["config"] = [without_keys(c, ["task"]) for c in scores["config"]]
    intervals = stats.config_intervals(scores, **kw)
    pairs = stats.pairwise(scores, **kw)
    settings: dict[str, dict[str, str]] = {}
    # keys an axis interpolates (Dr. GRPO's max_len: ${rollout.max_new_tokens}) are part of that axis: left
    # out of every configuration's other settings, so one config's reference is not a difference by itself
    refs = sorted({r for run in scores["run"] for r in (run_configs.get(run) or {}).get("refs", ())})
    for run, cfg in zip(scores["run"], scores["config"]):
        rc = run_configs.get(run)
        if rc is not None and cfg not in settings:
            settings[cfg] = stats.settings(rc["config"], ["task"] * stratified + refs)
    varying = stats.varying_axes(settings)
    changes, warns = [], []
    for p in pairs.itertuples():
        if p.a in settings and p.b in settings:
            diff = stats.differing_axes(settings[p.a], settings[p.b])
            changes.append(", ".join(diff))
            if len(diff) > 1:
                warns.append(warning(p.a, p.b, diff))
        else:
            changes.append("?")
    pairs["changes"] = changes
    return {"metric": metric, "scores": scores, "intervals": intervals, "pairs": pairs, "settings": settings,
            "varying": varying, "stratified": stratified, "warnings": warns}


def warning(a: str, b: str, axes: Sequence[str]) -> str:
    return (f"WARNING: {a} vs {b} changes {len(axes)} axes ({', '.join(axes)}): "
            "the difference cannot be attributed to one of them")


def _ci(v: float, lo: float, hi: float, digits: int = 3) -> str:
    if not math.isfinite(v):
        return ""
    band = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"{v:.{digits}f}{band}"


def intervals_markdown(intervals: pd.DataFrame) -> str:
    """Per configuration: runs, mean and IQM with their 95 % intervals, sd."""
    out = pd.DataFrame({"config": intervals["config"], "n": intervals["n_runs"], "tasks": intervals["n_tasks"],
                        "mean [95% CI]": [_ci(*r) for r in intervals[["mean", "mean_lo", "mean_hi"]].to_numpy()],
                        "IQM [95% CI]": [_ci(*r) for r in intervals[["iqm", "iqm_lo", "iqm_hi"]].to_numpy()],
                        "sd": intervals["sd"]})
    return markdown_table(out, 3)


def pairs_markdown(pairs: pd.DataFrame) -> str:
    """Every pair: difference a - b with its interval, resolved, P(a > b), seeds needed, changes."""
    out = pd.DataFrame({"a": pairs["a"], "b": pairs["b"],
                        "a - b [95% CI]": [_ci(*r) for r in pairs[["diff", "diff_lo", "diff_hi"]].to_numpy()],
                        "resolved": ["yes" if r else "no" for r in pairs["resolved"]],
                        "P(a > b) [95% CI]": [_ci(*r, digits=2) for r in
                                              pairs[["p_improve", "p_improve_lo", "p_improve_hi"]].to_numpy()],
                        "seeds/arm needed": ["inf" if n == math.inf else "" if not math.isfinite(n) else str(int(n))
                                             for n in pairs["seeds_needed"]],
                        "changes": pairs["changes"] if "changes" in pairs else ""})
    return markdown_table(out, 3)


def components_markdown(settings: dict[str, dict[str, str]], varying: Sequence[str]) -> str:
    """Per configuration its algorithm axes and every other setting that differs between
    configurations; the axes that differ are marked ``*`` and their values bold."""
    cols = [*stats.AXES, *(k for k in varying if k not in stats.AXES)]
    rows = [[c] + [f"**{s.get(k, '-')}**" if k in varying else s.get(k, "-") for k in cols]
            for c, s in settings.items()]
    return markdown_table(pd.DataFrame(rows, columns=["config", *(f"{k} *" if k in varying else k for k in cols)]))


def stats_text(st: dict[str, Any], eval_last: int, method: str = stats.METHOD) -> list[str]:
    """The statistics section (markdown lines) of the report and of the printed output.
    Configurations are named by the overrides on which their names differ (``short_labels``)."""
    m = st["metric"]
    what = (f"mean of the last {eval_last} held-out evaluations (`{VAL_METRICS[m]}`)" if m in VAL_METRICS else
            f"`{m}` (training reward: no held-out evaluation was logged)" if m == "final_reward" else f"`{m}`")
    strata = "tasks (stratified: seeds resampled within each task)" if st["stratified"] else "seeds"
    names = list(st["intervals"]["config"])
    label = short_labels(names)
    common = [o for o in split_overrides(names[0]) if o not in split_overrides(label[names[0]])] if names else []
    lines = [f"Score per run: {what}. Intervals: 95% {method} bootstrap over {strata} (scipy.stats.bootstrap)."]
    if common:
        lines.append(f"Overrides shared by every configuration (left out of the names below): `{','.join(common)}`.")
    fewest = int(st["intervals"]["n_runs"].min()) if names else 0
    lines += [f"Note: {fewest} runs in the smallest configuration. Below about 10 seeds the bootstrap intervals are "
              "too narrow (measured: 2 identical configurations come out resolved about 19% of the time with 3 seeds, "
              "14% with 5, 8% with 10, instead of 5%): treat a resolved verdict as provisional."] * (0 < fewest < 10)
    lines += ["", intervals_markdown(st["intervals"].assign(config=[label[c] for c in names])), ""]
    if st["pairs"].empty:
        return lines + [("(one configuration: nothing to compare)" if names else "(no finished run with a score)"), ""]
    pairs = st["pairs"].assign(a=st["pairs"]["a"].map(label), b=st["pairs"]["b"].map(label))
    lines += ["Pairwise: resolved = the 95% interval of a - b excludes 0; P(a > b) = probability of improvement "
              "(ties count half); seeds/arm needed = 2 ((z_0.975 + z_0.8) sd / diff)^2 (normal approximation: "
              "two-sided test at 0.05 with power 0.8, per task); changes = the axes on which a and b differ.", "",
              pairs_markdown(pairs), ""]
    warns = [warning(p.a, p.b, p.changes.split(", ")) for p in pairs.itertuples() if p.changes.count(",") >= 1]
    lines += [*warns, ""] if warns else []
    if st["settings"]:
        lines += ["Components (from each run's .hydra/config.yaml; * = differs between configurations):", "",
                  components_markdown({label.get(c, c): v for c, v in st["settings"].items()}, st["varying"]), ""]
    return lines
