"""rlopt.stats (intervals, pairwise comparisons, seeds needed, components) and the statistics
section of rlopt-report, on synthetic runs whose true differences are known.

The synthetic sweep (``build_synthetic_sweep``) has the layout of a real one (TensorBoard runs
under ``<sweep>/<run name>/``, Hydra output folders ``<sweep>/<job>/.hydra/``) and three
configurations over 10 seeds; a run's score is its configuration's true mean plus N(0, 0.05):

- ``clip.eps_high=0.28``: 0.8      } one axis (clip) apart, true difference 0.3: resolved
- ``clip.eps_high=0.2``:  0.5      } ratio, clip, kl apart, same distribution: not resolved
- ``algorithm=gspo``:     0.5      } (and a WARNING: three axes change)

``python -m tests.test_stats <folder>`` writes it (then ``rlopt-report <folder>``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from rlopt import report, stats

TRUE = {"clip.eps_high=0.28": 0.8, "clip.eps_high=0.2": 0.5, "algorithm=gspo": 0.5}
SEEDS, SD, EVAL_SD = 10, 0.05, 0.01
A, B, C = TRUE  # A beats B by 0.3; B and C are the same distribution


# ------------------------------------------------------------------------------ the synthetic sweep
def build_synthetic_sweep(root: Path, true: dict[str, float] = TRUE, seeds: int = SEEDS, rng_seed: int = 0,
                          steps: int = 60, evals: tuple[int, ...] = (10, 20, 30, 40, 50, 60)) -> Path:
    """Write TensorBoard scalars (``reward/mean`` every step, ``val/reward_greedy`` and
    ``val/accuracy_greedy`` at ``evals``) and each run's composed Hydra config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.utils.tensorboard import SummaryWriter

    from rlopt.train import CONFIG_DIR

    rng = np.random.default_rng(rng_seed)
    root.mkdir(parents=True, exist_ok=True)
    job = 0
    for name, mu in true.items():
        overrides = name.split(",")
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            cfg = compose("train", overrides=overrides)
        for seed in range(seeds):
            run = f"{name},seed={seed}"
            score = mu + SD * rng.standard_normal()
            w = SummaryWriter(str(root / run))
            for step in range(steps):
                w.add_scalar("reward/mean", score * (1 - math.exp(-step / 15)) + 0.05 * rng.standard_normal(), step)
            for step in evals:
                v = score * min(1.0, step / 30)  # flat from step 30: the last evaluations estimate the score
                w.add_scalar("val/reward_greedy", v + EVAL_SD * rng.standard_normal(), step)
                w.add_scalar("val/accuracy_greedy", 0.8 * v + EVAL_SD * rng.standard_normal(), step)
            w.close()
            folder = root / str(job) / ".hydra"
            folder.mkdir(parents=True)
            OmegaConf.save(OmegaConf.merge(cfg, {"seed": seed}), folder / "config.yaml")
            OmegaConf.save({"hydra": {"job": {"override_dirname": run}, "runtime": {"choices": {"task": "reverse"}}}},
                           folder / "hydra.yaml")
            job += 1
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic_sweep(tmp_path_factory.mktemp("synthetic") / "sweep")


# ------------------------------------------------------------------------------ point statistics
def test_iqm_and_probability_of_improvement_by_hand():
    assert stats.iqm([1, 2, 3, 4, 100, -50, 5, 6]) == pytest.approx(3.5)  # middle four of eight
    assert stats.probability_of_improvement([1, 2, 3], [2, 2, 0]) == pytest.approx(6 / 9)  # ties count half
    assert stats.probability_of_improvement([1, 1], [1, 1]) == 0.5
    assert stats.probability_of_improvement([3, 4], [1, 2]) == 1.0
    assert stats.probability_of_improvement([1, 2], [3, 4]) == 0.0


def test_seeds_needed_formula():
    z = scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)  # 2.8016
    assert stats.seeds_needed(0.1, 0.1) == math.ceil(2 * z ** 2) == 16  # 15.70 -> 16 per arm
    assert stats.seeds_needed(0.05, 0.1) == math.ceil(8 * z ** 2) == 63  # half the effect: four times the seeds
    assert stats.seeds_needed(0.1, 0.1, n_tasks=4) == 4  # per task: each arm is averaged over 4 tasks
    assert stats.seeds_needed(0.3, 0.01) == 2  # never fewer than 2
    assert stats.seeds_needed(0.0, 0.1) == math.inf and math.isnan(stats.seeds_needed(0.1, math.nan))


def test_mean_interval_is_the_t_interval():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(7, 3))
    v[0, 2] = np.nan
    mean, lo, hi = stats.mean_interval(v, axis=0)
    for j in range(3):
        col = v[:, j][np.isfinite(v[:, j])]
        want = scipy.stats.t.interval(0.95, len(col) - 1, loc=col.mean(), scale=scipy.stats.sem(col))
        assert mean[j] == pytest.approx(col.mean()) and (lo[j], hi[j]) == pytest.approx(want)
    _, lo, hi = stats.mean_interval([[1.0, 2.0]], axis=0)  # one seed: no interval
    assert np.isnan(lo).all() and np.isnan(hi).all()


# ------------------------------------------------------------------------------ intervals and comparisons
def _draw(rng, mu, n=SEEDS, sd=SD):
    return mu + sd * rng.standard_normal(n)


def test_compare_resolved_and_unresolved_pairs():
    rng = np.random.default_rng(0)
    a, b, c = _draw(rng, 0.8), _draw(rng, 0.5), _draw(rng, 0.5)
    ab = stats.compare(a, b)
    assert ab["resolved"] and ab["diff_lo"] > 0 and ab["diff_lo"] <= 0.3 <= ab["diff_hi"]
    assert ab["diff"] == pytest.approx(a.mean() - b.mean())
    assert ab["p_improve"] == 1.0 and ab["seeds_needed"] == 2
    bc = stats.compare(b, c)
    assert not bc["resolved"] and bc["diff_lo"] <= 0 <= bc["diff_hi"]
    assert 0.2 < bc["p_improve"] < 0.8 and bc["p_improve_lo"] <= 0.5 <= bc["p_improve_hi"]
    assert bc["seeds_needed"] > SEEDS  # not resolved by 10 seeds: the estimate asks for more
    assert bc["sd"] == pytest.approx(math.sqrt((b.std(ddof=1) ** 2 + c.std(ddof=1) ** 2) / 2))
    iv = stats.interval(a)
    assert iv["mean_lo"] < 0.8 < iv["mean_hi"] and iv["iqm_lo"] < iv["iqm"] < iv["iqm_hi"] and iv["n_runs"] == SEEDS
    assert iv["mean_hi"] - iv["mean_lo"] < 0.1  # sd 0.05 over 10 seeds: about +-0.03


def test_interval_coverage_and_false_resolution_rate():
    """Over 300 simulated experiments the 95 % interval of the difference holds the true 0.3 about
    95 % of the time (the percentile bootstrap runs a little short with 10 seeds), and a pair of
    equal configurations is declared resolved about 5 % of the time."""
    rng = np.random.default_rng(2)
    cover = resolved_null = 0
    for _ in range(300):
        r = stats.compare(_draw(rng, 0.8), _draw(rng, 0.5), n_resamples=999, seed=int(rng.integers(1 << 30)))
        cover += r["diff_lo"] <= 0.3 <= r["diff_hi"]
        resolved_null += stats.compare(_draw(rng, 0.5), _draw(rng, 0.5), n_resamples=999)["resolved"]
    assert 0.87 <= cover / 300 <= 0.99, cover
    assert resolved_null / 300 <= 0.13, resolved_null


def test_seeds_needed_gives_the_promised_power():
    """With the seeds_needed of a true difference 0.1 and sd 0.1 (16 per arm), about 80 % of
    experiments resolve it."""
    n = int(stats.seeds_needed(0.1, 0.1))
    rng = np.random.default_rng(3)
    hits = sum(stats.compare(_draw(rng, 0.6, n, 0.1), _draw(rng, 0.5, n, 0.1), n_resamples=999)["resolved"]
               for _ in range(200))
    assert 0.68 <= hits / 200 <= 0.93, hits


def test_stratified_bootstrap_keeps_runs_in_their_task():
    rng = np.random.default_rng(4)
    x = {"easy": _draw(rng, 0.9), "hard": _draw(rng, 0.1)}
    y = {"easy": _draw(rng, 0.85), "hard": _draw(rng, 0.05)}
    strat = stats.compare(x, y)
    pooled = stats.compare(np.concatenate(list(x.values())), np.concatenate(list(y.values())))
    assert strat["n_tasks"] == 2 and pooled["n_tasks"] == 1
    assert strat["diff"] == pytest.approx(pooled["diff"])  # balanced: same point estimate
    assert strat["resolved"] and not pooled["resolved"]  # the task spread is not noise
    assert strat["diff_hi"] - strat["diff_lo"] < 0.3 * (pooled["diff_hi"] - pooled["diff_lo"])
    assert strat["p_improve"] == pytest.approx(np.mean([stats.probability_of_improvement(x[t], y[t]) for t in x]))
    iv = stats.interval(x)
    assert iv["n_tasks"] == 2 and iv["mean"] == pytest.approx(0.5, abs=0.05) and iv["mean_hi"] - iv["mean_lo"] < 0.1
    # a task only one side has is left out of the comparison
    assert stats.compare({**x, "extra": [5.0, 6.0]}, y)["diff"] == pytest.approx(strat["diff"])


def test_degenerate_inputs():
    one = stats.interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["mean_lo"])
    same = stats.compare([0.5, 0.5], [0.5, 0.5])
    assert not same["resolved"] and same["seeds_needed"] == math.inf and same["p_improve"] == 0.5
    assert not stats.compare([0.5], [0.7])["resolved"]  # one seed each: no interval, never resolved
    assert stats.compare({"a": [1, 2]}, {"b": [1, 2]})["n_tasks"] == 0


def test_tables():
    rng = np.random.default_rng(5)
    scores = pd.DataFrame([{"config": c, "score": v} for c, mu in TRUE.items() for v in _draw(rng, mu)])
    iv = stats.config_intervals(scores)
    assert list(iv.columns) == list(stats.INTERVAL_COLUMNS) and (iv["n_runs"] == SEEDS).all()
    pairs = stats.pairwise(scores).set_index(["a", "b"])
    assert len(pairs) == 3 and (pairs["diff"] >= 0).all()  # the better mean first
    assert pairs.loc[(A, B), "resolved"] and pairs.loc[(A, C), "resolved"]
    assert not pairs.loc[[(B, C)] if (B, C) in pairs.index else [(C, B)], "resolved"].iloc[0]


def test_compare_configs_stratifies_over_tasks():
    """Runs over two tasks (``task=`` in their names): a configuration is its name without
    ``task=``, and its interval is stratified over the tasks."""
    rng = np.random.default_rng(6)
    rows = [{"run": f"algorithm={alg},seed={s},task={task}", "status": "ok", "final_reward": v}
            for alg, shift in (("grpo", 0.05), ("gspo", 0.0)) for task, mu in (("easy", 0.9), ("hard", 0.1))
            for s, v in enumerate(_draw(rng, mu + shift, 8, 0.02))]
    runs = pd.DataFrame(rows).assign(config=lambda d: d["run"].map(report.config_name), seed=0.0)
    st = report.compare_configs(runs, {}, "final_reward")
    assert st["stratified"] and set(st["intervals"]["config"]) == {"algorithm=grpo", "algorithm=gspo"}
    assert (st["intervals"]["n_tasks"] == 2).all() and (st["intervals"]["n_runs"] == 16).all()
    pair = st["pairs"].iloc[0]
    assert pair["a"] == "algorithm=grpo" and pair["resolved"] and pair["diff_lo"] <= 0.05 <= pair["diff_hi"]
    assert pair["changes"] == "?" and not st["warnings"]  # no saved configs: the axes are unknown
    text = "\n".join(report.stats_text(st, 3))
    assert "stratified" in text and "`final_reward` (training reward" in text


# ------------------------------------------------------------------------------ components
def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlopt.train import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=False)


def test_components_and_differing_axes():
    grpo, gspo = stats.settings(_compose("algorithm=grpo")), stats.settings(_compose("algorithm=gspo"))
    assert grpo["ratio"] == "TokenRatio(max_log_ratio=20)"
    assert grpo["kl"] == "estimator=k3, coef=0.04, ref_sync_every=0, ref_sync_alpha=0.6"
    assert grpo["clip"] == "PPOClip(eps_low=0.2, eps_high=0.2)"  # null options left out
    assert gspo["kl"] == "estimator=null, coef=0" and grpo["entropy"] == "coef=0"
    assert stats.differing_axes(grpo, gspo) == ["ratio", "clip", "kl"]  # algorithm_name is a label, not an axis
    lr = stats.settings(_compose("algorithm=grpo", "optimizer.lr=1e-3"))
    assert stats.differing_axes(grpo, lr) == ["optimizer.lr"]
    assert stats.varying_axes({"g": grpo, "s": gspo, "l": lr}) == ["ratio", "clip", "kl", "optimizer.lr"]
    legacy = {"loss": {"kl": "k3", "kl_coef": 0.04, "entropy_coef": 0.01}}  # before the kl / entropy groups
    assert stats.components(legacy)["kl"] == "estimator=k3, coef=0.04"
    assert stats.components(legacy)["entropy"] == "coef=0.01"


def test_run_configs_resolve_interpolated_axes(tmp_path):
    """clip_range sweeps ``clip.eps_low: ${clip_eps}``: the change shows in clip, and clip_eps
    itself is not counted as a second axis."""
    from omegaconf import OmegaConf

    for job, eps in enumerate((0.1, 0.2)):
        d = tmp_path / str(job) / ".hydra"
        d.mkdir(parents=True)
        cfg = {"clip_eps": eps, "output_dir": "${hydra:runtime.output_dir}",
               "clip": {"_target_": "x.PPOClip", "eps_low": "${clip_eps}"}}
        OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
        OmegaConf.save({"hydra": {"job": {"override_dirname": f"clip_eps={eps},seed=0"}}}, d / "hydra.yaml")
    rc = report.load_run_configs(tmp_path)
    assert set(rc) == {"clip_eps=0.1,seed=0", "clip_eps=0.2,seed=0"}
    cfg = rc["clip_eps=0.1,seed=0"]
    assert cfg["config"]["clip"]["eps_low"] == 0.1 and cfg["refs"] == {"clip_eps"}
    assert cfg["config"]["output_dir"] == "${hydra:runtime.output_dir}"  # unresolvable: kept as text
    s1, s2 = (stats.settings(rc[r]["config"], sorted(rc[r]["refs"])) for r in sorted(rc))
    assert stats.differing_axes(s1, s2) == ["clip"]


# ------------------------------------------------------------------------------ rlopt-report on the synthetic sweep
def test_report_on_synthetic_runs(synthetic, capsys):
    assert report.main([str(synthetic), "--resamples", "4999"]) == 0
    printed = capsys.readouterr().out
    out = synthetic / "report"
    for f in ("stats.csv", "pairs.csv", "components.csv", "eval.png", "reward.png", "report.md"):
        assert (out / f).is_file(), f
    runs = pd.read_csv(out / "runs.csv")
    assert (runs["evals"] == 6).all()
    r0 = runs.iloc[0]
    assert r0["val_reward_greedy"] == pytest.approx(report.load_runs(synthetic).query(
        "run == @r0.run and tag == 'val/reward_greedy'").sort_values("step")["value"].iloc[-3:].mean())
    iv = pd.read_csv(out / "stats.csv").set_index("config")
    for c, mu in TRUE.items():  # each configuration's interval holds its true mean
        assert iv.loc[c, "mean_lo"] <= mu <= iv.loc[c, "mean_hi"], c
    pairs = pd.read_csv(out / "pairs.csv")
    key = {frozenset((p.a, p.b)): p for p in pairs.itertuples()}
    ab, ac, bc = key[frozenset((A, B))], key[frozenset((A, C))], key[frozenset((B, C))]
    assert ab.a == A and ab.resolved and ab.diff_lo <= 0.3 <= ab.diff_hi and ab.p_improve == 1.0
    assert ac.a == A and ac.resolved and ac.diff_lo <= 0.3 <= ac.diff_hi
    assert not bc.resolved and bc.diff_lo <= 0 <= bc.diff_hi and bc.seeds_needed > SEEDS
    assert ab.seeds_needed == 2 and ab.changes == "clip" and bc.changes == "ratio, clip, kl"
    # printed: the score, the intervals, the pairs with the verdict, the warnings, the components
    assert "mean of the last 3 held-out evaluations (`val/reward_greedy`)" in printed
    assert printed.count("WARNING") == 2 and f"WARNING: {A} vs {C} changes 3 axes (ratio, clip, kl)" in printed
    ci = f"{ab.diff:.3f} [{ab.diff_lo:.3f}, {ab.diff_hi:.3f}]"
    assert f"| {A} | {B} | {ci} | yes | 1.00 [1.00, 1.00] | 2 | clip |" in printed
    assert f"| {bc.a} | {bc.b} | {bc.diff:.3f} [{bc.diff_lo:.3f}, {bc.diff_hi:.3f}] | no |" in printed
    assert "ratio *" in printed and "| advantage |" in printed
    comp = pd.read_csv(out / "components.csv").set_index("config")
    assert comp.loc[C, "ratio"].startswith("SequenceRatio")
    assert comp.loc[A, "clip"] == "PPOClip(eps_low=0.2, eps_high=0.28)"
    # another score and bootstrap settings from the command line
    assert report.main([str(synthetic), "--metric", "val_accuracy_greedy", "--eval-last", "1", "--ci-method", "BCa",
                        "--out", str(out / "acc")]) == 0
    assert "mean of the last 1 held-out evaluations (`val/accuracy_greedy`)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([str(synthetic), "--metric", "nope", "--out", str(out / "x")])


def test_eval_curve_bands(synthetic):
    df = report.load_runs(synthetic)
    mean, lo, hi = report.curve_bands(df, "val/reward_greedy")
    assert list(mean.index) == [10, 20, 30, 40, 50, 60] and set(mean.columns) == set(TRUE)
    per_run = df[(df["tag"] == "val/reward_greedy") & (df["step"] == 60) & (df["config"] == A)]["value"]
    want = scipy.stats.t.interval(0.95, len(per_run) - 1, loc=per_run.mean(), scale=scipy.stats.sem(per_run))
    assert (lo.loc[60, A], hi.loc[60, A]) == pytest.approx(want)


if __name__ == "__main__":
    print(build_synthetic_sweep(Path(sys.argv[1])))
