"""Statistics that say whether a difference between configurations is resolved by the seeds run.

Pure functions (numpy, scipy, pandas; no Lightning, no files) used by ``rlopt-report``; the
formulas and how to read them are in ``docs/experiments.md``.

One number per run, its *score* (``rlopt-report``: the mean of its last K held-out
evaluations). For a configuration, its runs over seeds (and tasks, if the sweep has several):

- ``interval(x)``: the mean and the interquartile mean (IQM, the mean of the middle 50 %) with
  percentile-bootstrap 95 % intervals (``scipy.stats.bootstrap``), *stratified* over tasks:
  resampling draws seeds within each task, never moves runs between tasks;
- ``compare(x, y)``: the difference of means ``mean(x) - mean(y)`` with its stratified bootstrap
  interval, ``resolved`` (the interval excludes 0), the probability of improvement
  ``P(X > Y) + 0.5 P(X = Y)`` (with its interval), the pooled within-task standard deviation
  and ``seeds_needed``: the seeds per arm that a two-sided test at level 0.05 with power 0.8
  needs to resolve the observed difference (normal approximation,
  ``n = 2 ((z_0.975 + z_0.8) sd / diff)^2``, divided by the number of tasks);
- ``config_intervals`` / ``pairwise``: the same for a table of runs (``config, task, score``);
- ``mean_interval``: the t interval of a mean over seeds, per step (learning-curve bands);
- ``components`` / ``differing_axes``: what a configuration is made of (advantage, ratio, clip,
  aggregation, kl, entropy: the resolved Hydra config groups) and where two configurations differ.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats

CONFIDENCE = 0.95
ALPHA = 0.05          # two-sided level of the test behind seeds_needed
POWER = 0.8           # its power
N_RESAMPLES = 9999
METHOD = "percentile"  # scipy.stats.bootstrap method: percentile | basic | BCa

#: the algorithm's axes: the Hydra config groups a configuration is composed of
AXES = ("advantage", "ratio", "clip", "aggregation", "kl", "entropy", "correction", "masks")
#: top-level keys that name or place a run rather than change what it computes
IGNORED_KEYS = frozenset({"seed", "run_name", "output_dir", "log_root", "export_dir", "ckpt_path",
                          "algorithm_name", "hydra", "loss"})

_RNG_KW = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


# ------------------------------------------------------------------------------------ point statistics
def iqm(x: Any, axis: int = -1) -> Any:
    """Interquartile mean: the mean after dropping the lowest and highest 25 % (scipy's
    ``trim_mean(x, 0.25)``: ``floor(n/4)`` values cut at each end)."""
    return scipy.stats.trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """``P(X > Y) + 0.5 P(X = Y)`` for X a run of ``x``, Y a run of ``y`` (the Mann-Whitney
    U statistic divided by ``len(x) * len(y)``)."""
    return float(_poi(np.asarray(x, float), np.asarray(y, float)))


def _poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    gt = (x[..., :, None] > y[..., None, :]).mean(axis=(-2, -1))
    eq = (x[..., :, None] == y[..., None, :]).mean(axis=(-2, -1))
    return gt + 0.5 * eq


def seeds_needed(diff: float, sd: float, n_tasks: int = 1, alpha: float = ALPHA, power: float = POWER) -> float:
    """Seeds per arm (per task) for a two-sided two-sample z test at level ``alpha`` to detect a
    true difference ``diff`` with probability ``power`` when each run's score has standard
    deviation ``sd``: ``ceil(2 ((z_{1-alpha/2} + z_{power}) sd / diff)^2 / n_tasks)``, at least 2.
    ``inf`` when ``diff`` is 0; NaN when ``sd`` or ``diff`` is unknown."""
    if not (math.isfinite(diff) and math.isfinite(sd)):
        return math.nan
    if diff == 0:
        return math.inf
    z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)
    n = 2.0 * (z * sd / diff) ** 2 / max(1, int(n_tasks))
    return float(max(2, math.ceil(n - 1e-9)))


def pooled_sd(groups: Sequence[Sequence[float]]) -> float:
    """Within-group (within-task) standard deviation: ``sqrt(sum (x - mean_group)^2 / (N - groups))``."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    dof = sum(len(g) for g in groups) - len(groups)
    if dof < 1:
        return math.nan
    return math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / dof)


def _task_mean(*groups: np.ndarray) -> np.ndarray:
    """The mean over tasks of each task's mean over seeds."""
    return np.mean(np.stack([g.mean(axis=-1) for g in groups]), axis=0)


def _pooled_iqm(*groups: np.ndarray) -> np.ndarray:
    return iqm(np.concatenate(groups, axis=-1), axis=-1)


# ------------------------------------------------------------------------------------ bootstrap
def bootstrap_interval(groups: Sequence[Sequence[float]], statistic: Callable[..., np.ndarray], *,
                       confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, method: str = METHOD,
                       seed: int = 0) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` interval of ``statistic(*groups)``, each group resampled on its
    own (a stratified bootstrap: the strata are the groups). ``statistic`` takes the groups as
    arrays whose last axis holds the values (vectorised). A one-value group resamples to itself
    and is held fixed; with no group of two or more values the interval is ``(nan, nan)``. Where
    ``BCa`` or ``basic`` give no finite interval (a degenerate bootstrap distribution, e.g. every
    resample with P(X > Y) = 1), the percentile interval is returned."""
    groups = [np.asarray(g, dtype=float).ravel() for g in groups]
    varying = [i for i, g in enumerate(groups) if len(g) >= 2]
    if not varying:
        return math.nan, math.nan

    def stat(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = np.broadcast_shapes(*(s.shape[:-1] for s in samples))
        drawn = dict(zip(varying, samples))
        args = [np.broadcast_to(drawn.get(i, g), lead + (drawn[i].shape[-1] if i in drawn else len(g),))
                for i, g in enumerate(groups)]
        return statistic(*args)

    def run(m: str) -> tuple[float, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # BCa on degenerate data: NaN, handled below
            warnings.simplefilter("ignore", getattr(scipy.stats, "DegenerateDataWarning", RuntimeWarning))
            res = scipy.stats.bootstrap([groups[i] for i in varying], stat, vectorized=True, axis=-1,
                                        n_resamples=int(n_resamples), batch=1000, confidence_level=confidence,
                                        method=m, **{_RNG_KW: np.random.default_rng(seed)})
        lo, hi = (float(v) for v in res.confidence_interval)
        return lo, hi

    lo, hi = run(method)
    if method != "percentile" and not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = run("percentile")  # BCa cannot handle a degenerate bootstrap distribution (e.g. P = 1)
    return lo, hi


def _by_task(x: Any) -> dict[str, np.ndarray]:
    if isinstance(x, Mapping):
        out = {str(k): np.asarray(v, float).ravel() for k, v in x.items()}
    else:
        out = {"": np.asarray(x, float).ravel()}
    out = {k: v[np.isfinite(v)] for k, v in out.items()}
    return {k: v for k, v in out.items() if len(v)}


def interval(x: Any, *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, method: str = METHOD,
             seed: int = 0) -> dict[str, float]:
    """Mean (over tasks of the mean over seeds) and pooled IQM of the scores ``x`` (an array, or
    ``{task: array}``) with stratified bootstrap intervals. NaN scores are dropped."""
    tasks = _by_task(x)
    groups = list(tasks.values())
    out: dict[str, float] = {"n_runs": sum(len(g) for g in groups), "n_tasks": len(groups)}
    if not groups:
        return {**out, **dict.fromkeys(("mean", "mean_lo", "mean_hi", "iqm", "iqm_lo", "iqm_hi", "sd"), math.nan)}
    kw = dict(confidence=confidence, n_resamples=n_resamples, method=method, seed=seed)
    out["mean"] = float(_task_mean(*groups))
    out["mean_lo"], out["mean_hi"] = bootstrap_interval(groups, _task_mean, **kw)
    out["iqm"] = float(_pooled_iqm(*groups))
    out["iqm_lo"], out["iqm_hi"] = bootstrap_interval(groups, _pooled_iqm, **kw)
    out["sd"] = pooled_sd(groups)
    return out


def compare(x: Any, y: Any, *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
            method: str = METHOD, seed: int = 0, alpha: float = ALPHA, power: float = POWER) -> dict[str, Any]:
    """``x`` against ``y`` (arrays, or ``{task: array}``; only the tasks both have are used):

    ``diff`` = mean(x) - mean(y) (means over tasks of the means over seeds), ``diff_lo``,
    ``diff_hi`` its stratified bootstrap interval, ``resolved`` (the interval excludes 0),
    ``p_improve`` = P(X > Y) + 0.5 P(X = Y) averaged over tasks, with ``p_improve_lo/hi``,
    ``sd`` (the two arms' pooled within-task sd, ``sqrt((sd_x^2 + sd_y^2) / 2)``) and
    ``seeds_needed`` (:func:`seeds_needed` of ``diff`` and ``sd``)."""
    tx, ty = _by_task(x), _by_task(y)
    shared = [t for t in tx if t in ty]
    gx, gy = [tx[t] for t in shared], [ty[t] for t in shared]
    out: dict[str, Any] = {"n_x": sum(map(len, gx)), "n_y": sum(map(len, gy)), "n_tasks": len(shared)}
    if not shared:
        return {**out, **dict.fromkeys(("diff", "diff_lo", "diff_hi", "p_improve", "p_improve_lo", "p_improve_hi",
                                        "sd", "seeds_needed"), math.nan), "resolved": False}
    k = len(shared)
    kw = dict(confidence=confidence, n_resamples=n_resamples, method=method, seed=seed)

    def diff(*g: np.ndarray) -> np.ndarray:
        return _task_mean(*g[:k]) - _task_mean(*g[k:])

    def poi(*g: np.ndarray) -> np.ndarray:
        return np.mean(np.stack([_poi(a, b) for a, b in zip(g[:k], g[k:])]), axis=0)

    out["diff"] = float(diff(*gx, *gy))
    out["diff_lo"], out["diff_hi"] = bootstrap_interval([*gx, *gy], diff, **kw)
    out["resolved"] = bool(out["diff_lo"] > 0 or out["diff_hi"] < 0)  # NaN compares False: not resolved
    out["p_improve"] = float(poi(*gx, *gy))
    out["p_improve_lo"], out["p_improve_hi"] = bootstrap_interval([*gx, *gy], poi, **kw)
    sx, sy = pooled_sd(gx), pooled_sd(gy)
    out["sd"] = math.sqrt((sx ** 2 + sy ** 2) / 2) if math.isfinite(sx) and math.isfinite(sy) else math.nan
    out["seeds_needed"] = seeds_needed(out["diff"], out["sd"], k, alpha, power)
    return out


# ------------------------------------------------------------------------------------ tables
INTERVAL_COLUMNS = ("config", "n_runs", "n_tasks", "mean", "mean_lo", "mean_hi", "iqm", "iqm_lo", "iqm_hi", "sd")
PAIR_COLUMNS = ("a", "b", "n_a", "n_b", "diff", "diff_lo", "diff_hi", "resolved", "p_improve", "p_improve_lo",
                "p_improve_hi", "sd", "seeds_needed")


def _groups(scores: pd.DataFrame, score: str) -> dict[str, dict[str, np.ndarray]]:
    """``{config: {task: scores}}`` of the runs with a finite score (task ``""`` without a task column)."""
    d = scores[np.isfinite(scores[score].astype(float))]
    task = d["task"].astype(str) if "task" in d else pd.Series("", index=d.index)
    return {c: {t: gg[score].to_numpy(float) for t, gg in g.groupby(task.loc[g.index], sort=True)}
            for c, g in d.groupby("config", sort=True)}


def config_intervals(scores: pd.DataFrame, score: str = "score", **kw: Any) -> pd.DataFrame:
    """One row per configuration of ``scores`` (one row per run: ``config``, ``score`` and
    optionally ``task``): :func:`interval` of its scores. Columns ``INTERVAL_COLUMNS``."""
    rows = [{"config": c, **interval(g, **kw)} for c, g in _groups(scores, score).items()]
    out = pd.DataFrame(rows, columns=list(INTERVAL_COLUMNS))
    out[["n_runs", "n_tasks"]] = out[["n_runs", "n_tasks"]].astype(int)
    return out


def pairwise(scores: pd.DataFrame, score: str = "score", **kw: Any) -> pd.DataFrame:
    """Every pair of configurations of ``scores``: :func:`compare`, the better mean first (so
    ``diff >= 0``), sorted by configuration. Columns ``PAIR_COLUMNS``."""
    groups = _groups(scores, score)
    means = {c: float(_task_mean(*g.values())) for c, g in groups.items()}
    rows = []
    for a, b in itertools.combinations(groups, 2):
        if means[b] > means[a]:
            a, b = b, a
        r = compare(groups[a], groups[b], **kw)
        rows.append({"a": a, "b": b, "n_a": r["n_x"], "n_b": r["n_y"], **{k: r[k] for k in PAIR_COLUMNS[4:]}})
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def mean_interval(values: Any, axis: int = 0, confidence: float = CONFIDENCE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, lo, hi)`` along ``axis`` (NaN ignored): the t interval of the mean,
    ``mean +- t_{(1+confidence)/2, n-1} sd / sqrt(n)``; lo/hi NaN where n < 2."""
    v = np.asarray(values, dtype=float)
    n = np.sum(np.isfinite(v), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(v, axis=axis)
        sd = np.nanstd(v, axis=axis, ddof=1)
        half = scipy.stats.t.ppf((1 + confidence) / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------------ components
def _fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(i) for i in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt_value(i)}" for k, i in v.items()) + "}"
    return str(v)


def describe(node: Any) -> str:
    """``{_target_: rlopt.algorithms.PPOClip, eps_low: 0.2, dual_clip: null}`` -> ``PPOClip(eps_low=0.2)``
    (null parameters, i.e. unused options, are left out); a node without ``_target_``:
    ``key=value, ...`` (all of them); None / missing: ``-``."""
    if node is None:
        return "-"
    if not isinstance(node, Mapping):
        return _fmt_value(node)
    if node and "_target_" not in node and all(isinstance(v, Mapping) and "_target_" in v for v in node.values()):
        return " + ".join(f"{k}:{describe(v)}" for k, v in node.items())  # a dict of named components (masks)
    params = ", ".join(f"{k}={_fmt_value(v)}" for k, v in node.items()
                       if k not in ("_target_", "_partial_") and (v is not None or "_target_" not in node))
    if "_target_" in node:
        return f"{str(node['_target_']).rpartition('.')[2]}({params})"
    return params or "-"


def components(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The algorithm axes of a (resolved or saved) training config, as text: advantage, ratio,
    clip, aggregation, correction (class and parameters), masks (each named mask), kl
    (``estimator``, ``coef``), entropy (``coef``). A swapped component is one axis, whatever
    parameters come with it.
    Configs from before the ``loss`` group became ``kl`` + ``entropy`` (``loss.kl``,
    ``loss.kl_coef``, ``loss.entropy_coef``) are read too."""
    cfg = dict(cfg or {})
    legacy = cfg.get("loss") if isinstance(cfg.get("loss"), Mapping) else None
    if legacy is not None and "kl" not in cfg:
        cfg["kl"] = {"estimator": legacy.get("kl"), "coef": legacy.get("kl_coef")}
    if legacy is not None and "entropy" not in cfg:
        cfg["entropy"] = {"coef": legacy.get("entropy_coef", 0.0)}
    return {axis: describe(cfg.get(axis)) for axis in AXES}


def other_settings(cfg: Mapping[str, Any], ignore: Sequence[str] = ()) -> dict[str, str]:
    """Every other leaf of the config (dotted key -> text), without ``IGNORED_KEYS``, the
    :data:`AXES` and the dotted keys ``ignore`` (with everything under them)."""
    skip = set(IGNORED_KEYS) | set(AXES) | set(ignore)
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if key in skip:
            return
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = _fmt_value(node)

    walk(dict(cfg or {}), "")
    return out


def settings(cfg: Mapping[str, Any], ignore: Sequence[str] = ()) -> dict[str, str]:
    """:func:`components` followed by :func:`other_settings`: everything a comparison can change."""
    return {**components(cfg), **other_settings(cfg, ignore)}


def differing_axes(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The keys of two :func:`settings` dicts whose values differ (a key only one has differs)."""
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def varying_axes(per_config: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The keys on which any of the configurations' :func:`settings` differ (AXES first)."""
    keys = list(dict.fromkeys(k for s in per_config.values() for k in s))
    return [k for k in keys if len({s.get(k) for s in per_config.values()}) > 1]
