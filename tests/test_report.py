"""Sweeps (sweeps/*.yaml), rlopt-report (rlopt/report.py) and the TensorBoard layout callback.

The report tests read a tiny real sweep (tests/sweep_fixture.py): 2 algorithms x 2 seeds that
finish plus 2 runs that fail at start-up.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from rlopt import report
from rlopt.callbacks import ClipFractionLayout, clip_fraction_layout
from rlopt.conf import check_config
from rlopt.train import CONFIG_DIR
from tests.sweep_fixture import ALGORITHMS, BAD_SEED, GOOD_SEEDS, SWEEPS, tiny_sweep  # noqa: F401

SWEEP_NAMES = tuple(sorted(p.stem for p in SWEEPS.glob("*.yaml") if p.stem != "sweep_base"))  # every sweep


# ------------------------------------------------------------------------------ sweep configs
def compose_sweep(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """Compose a sweep YAML like ``rlopt-train --config-dir sweeps --config-name <name>`` does
    (sweeps/ and configs/ both on the search path)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        return compose(name, overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", *overrides], return_hydra_config=True)


def grid(params: dict[str, str]) -> list[list[str]]:
    """Every job's overrides of a basic sweep's ``hydra.sweeper.params`` (what -m launches)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize("size,steps,trials", [("quick", 100, 12), ("full", 500, 40)])
@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_sweep_yaml_composes(name, size, steps, trials):
    cfg = compose_sweep(name, [f"size={size}"])
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["log_root"] == "${hydra:sweep.dir}"  # one TensorBoard root per sweep
    # every sweep is off-policy; the suite runs each task for its own budget (task.budget_steps)
    assert cfg.steps == (cfg.task.budget_steps if name == "suite" else steps) and cfg.num_minibatches == 4
    h = cfg.hydra
    assert h.launcher._target_.endswith("JoblibLauncher") and h.launcher.backend == "loky" and h.launcher.n_jobs == 2
    assert raw["hydra"]["sweep"]["subdir"] == "${hydra.job.num}"  # each run its own output folder
    assert "size" in h.job.config.override_dirname.exclude_keys
    assert h.runtime.choices.size == size
    if name == "clip_optuna":
        assert h.sweeper._target_.endswith("OptunaSweeper")
        assert h.sweeper.direction == "maximize" and h.sweeper.n_trials == trials
        assert set(h.sweeper.params) == {"clip.eps_low", "clip.eps_high"}
        assert cfg.algorithm_name == "gspo"
    else:
        assert h.sweeper._target_.endswith("BasicSweeper")


@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_sweeps_pick_group_options_in_their_defaults_list(name):
    """``algorithm: dapo`` as a plain key sets a string and silently keeps the default algorithm: a
    sweep must choose a group's option with ``override /algorithm: dapo`` in its defaults list."""
    from rlopt.resources import config_dir

    raw = OmegaConf.to_container(OmegaConf.load(SWEEPS / f"{name}.yaml"), resolve=False)
    groups = {p.name for p in Path(config_dir()).iterdir() if p.is_dir() and not p.name.startswith("_")}
    plain = {k for k, v in raw.items() if k in groups and not isinstance(v, dict)}
    assert not plain, f"{name}.yaml sets config groups as plain keys: {plain}"


@pytest.mark.parametrize("name,n_jobs", [("grpo_vs_gspo", 9), ("clip_range", 10), ("hybrid_grid", 12),
                                         ("bf16_mismatch", 20), ("gspo_clip_pair", 10), ("clip_higher_entropy", 10),
                                         ("length_bias", 10), ("suite", 72)])
def test_every_grid_point_is_a_valid_config(name, n_jobs):
    params = dict(compose_sweep(name).hydra.sweeper.params)
    jobs = grid(params)
    assert len(jobs) == n_jobs
    seen = set()
    for job in jobs:
        job = [o for o in job if not o.startswith("seed=")]  # seeds do not change the composition
        if tuple(job) in seen:
            continue
        seen.add(tuple(job))
        check_config(compose_sweep(name, job))  # builds the parts; fails on a bad combination


def test_grid_contents():
    assert grid(dict(compose_sweep("grpo_vs_gspo").hydra.sweeper.params))[0] == ["algorithm=grpo", "seed=0"]
    cfg = compose_sweep("clip_range", ["clip_eps=0.05"])
    assert cfg.clip.eps_low == cfg.clip.eps_high == 0.05 and cfg.clip._target_.endswith("PPOClip")
    cfg = compose_sweep("hybrid_grid", ["advantage=group_mean", "ratio=token", "clip=ppo_gspo", "kl=none"])
    assert cfg.clip.eps_low == 3e-4 and cfg.ratio._target_.endswith("TokenRatio") and cfg.kl.estimator is None
    cfg = compose_sweep("clip_optuna", ["clip.eps_low=1e-4", "clip.eps_high=0.03"])  # the search box's corners
    check_config(cfg)


# ------------------------------------------------------------------------------ the real sweep
def test_sweep_runs_share_one_tensorboard_root(tiny_sweep):
    runs = {p.name for p in tiny_sweep.iterdir() if any(p.glob("events.out.tfevents.*"))}
    names = {report.config_name(r) for r in runs}
    assert len(runs) == len(ALGORITHMS) * len(GOOD_SEEDS) and len(names) == len(ALGORITHMS)
    for r in runs:  # run name = the run's overrides (size is excluded)
        o = report.parse_overrides(r)
        assert o["algorithm"] in ALGORITHMS and o["seed"] in GOOD_SEEDS and "size" not in o
    jobs = sorted(p for p in tiny_sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == len(ALGORITHMS) * (len(GOOD_SEEDS) + 1)
    ok = [j for j in jobs if not (j / "FAILED.txt").exists()]
    assert len(ok) == 4 and all((j / "tiny_model" / "config.json").is_file() for j in ok)  # nothing shared


def test_failed_runs_write_failed_txt_and_the_sweep_goes_on(tiny_sweep):
    failed = sorted(tiny_sweep.glob("*/FAILED.txt"))
    assert len(failed) == len(ALGORITHMS)
    for f in failed:
        assert f"seed={BAD_SEED}" in (f.parent / ".hydra" / "overrides.yaml").read_text().replace("- ", "")
        assert "ValueError" in f.read_text()


def test_custom_scalars_layout_is_written(tiny_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(p for p in tiny_sweep.iterdir() if any(p.glob("events.out.tfevents.*")))
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert "clip/token_region" in acc.Tags()["scalars"]


# ------------------------------------------------------------------------------ rlopt-report
def test_load_runs_summarize_aggregate(tiny_sweep):
    df = report.load_runs(tiny_sweep)
    assert list(df.columns) == ["run", "config", "seed", "tag", "step", "value", "wall_time"]
    assert {"reward/mean", "clip/token_region", "clip/seq_low", "entropy/mean", "perf/tokens_per_s"} <= set(df["tag"])
    failures = report.load_failures(tiny_sweep)
    assert list(failures.columns) == list(report.FAILURE_COLUMNS) and len(failures) == 2
    assert failures["first_line"].str.startswith("Traceback").all()
    assert failures["last_line"].str.contains("ValueError").all()
    runs = report.summarize(df, failures, last=10)
    assert list(runs.columns) == list(report.RUN_COLUMNS) and len(runs) == 6
    assert (runs["status"] == "failed").sum() == 2 and (runs["status"] == "ok").sum() == 4
    ok = runs[runs["status"] == "ok"]
    assert (ok["steps"] == 6).all()
    r0 = ok.iloc[0]
    rewards = df[(df["run"] == r0["run"]) & (df["tag"] == "reward/mean")].sort_values("step")["value"]
    assert math.isclose(r0["final_reward"], rewards.iloc[-10:].mean(), rel_tol=1e-9)
    assert r0["best_reward"] >= r0["final_reward"] - 1e-12
    for col in ("clip_token_low", "clip_token_high", "clip_token_region", "clip_seq_region", "entropy", "tokens_per_s"):
        assert ok[col].notna().all(), col
    assert ok[ok["run"].str.contains("algorithm=grpo")]["kl"].notna().all()  # GRPO has a KL term, GSPO none
    configs = report.aggregate(runs)
    assert len(configs) == 2 and (configs["n_runs"] == 2).all() and (configs["n_failed"] == 1).all()
    for m in report.METRICS:
        assert f"{m}_mean" in configs and f"{m}_std" in configs
    g = configs.iloc[0]
    members = ok[ok["config"] == g["config"]]
    assert math.isclose(g["final_reward_mean"], members["final_reward"].mean(), rel_tol=1e-9)
    assert math.isclose(g["final_reward_std"], members["final_reward"].std(ddof=1), rel_tol=1e-9, abs_tol=1e-12)


def test_rlopt_report_cli(tiny_sweep, tmp_path, capsys):
    assert report.main([str(tiny_sweep)]) == 0  # default output folder: <sweep dir>/report
    out = tiny_sweep / "report"
    printed = capsys.readouterr().out
    assert printed.count("FAILED") == 2 and "ValueError" in printed
    for f in ("report.md", "runs.csv", "configs.csv", "stats.csv", "pairs.csv", "components.csv", "reward.png",
              "eval.png", "clip_fractions.png"):
        assert (out / f).is_file(), f
    for png in ("reward.png", "clip_fractions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs.columns) == list(report.RUN_COLUMNS)
    assert sorted(runs["status"]) == ["failed"] * 2 + ["ok"] * 4
    configs = pd.read_csv(out / "configs.csv")
    assert {"config", "n_runs", "n_failed", "final_reward_mean", "final_reward_std", "clip_token_region_mean",
            "clip_token_region_std", "clip_seq_high_mean", "kl_mean", "entropy_mean", "tokens_per_s_mean"} <= set(configs)
    md = (out / "report.md").read_text()
    assert "## Per configuration" in md and "## Per run" in md and "## Failed runs" in md
    assert " ± " in md and "![clip_fractions](clip_fractions.png)" in md
    # statistics (rlopt/stats.py, tests/test_stats.py): the held-out score, intervals, the pair, the components
    assert "## Statistics" in md and "![eval](eval.png)" in md
    assert "mean of the last 3 held-out evaluations (`val/reward_greedy`)" in printed
    assert "WARNING: algorithm=grpo vs algorithm=gspo changes 3 axes (ratio, clip, kl)" in printed
    finished = runs[runs["status"] == "ok"]
    assert finished["val_reward_greedy"].notna().all() and (finished["evals"] >= 1).all()
    stats_csv, pairs = pd.read_csv(out / "stats.csv"), pd.read_csv(out / "pairs.csv")
    assert len(stats_csv) == 2 and (stats_csv["n_runs"] == 2).all() and len(pairs) == 1
    assert pairs.loc[0, "changes"] == "ratio, clip, kl" and {"resolved", "p_improve", "seeds_needed"} <= set(pairs)
    comp = pd.read_csv(out / "components.csv", index_col="config")
    assert comp.filter(like="algorithm=gspo", axis=0)["ratio"].iloc[0].startswith("SequenceRatio")
    assert report.main([str(tmp_path)]) == 1  # nothing to report
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])


def test_failed_runs_are_named_like_tensorboard_runs_from_a_parent_folder(tiny_sweep):
    # a report over several sweeps (e.g. rlopt-report multirun/): names carry the sweep's path
    failures = report.load_failures(tiny_sweep.parent)
    mine = failures[failures["folder"].str.startswith("tiny_sweep/")]
    assert len(mine) == 2 and mine["run"].str.startswith("tiny_sweep/algorithm=").all()
    assert (mine["config"].str.contains(f"seed={BAD_SEED}") == False).all()  # noqa: E712
    assert report.config_name(mine["run"].iloc[0]).startswith("tiny_sweep/")


def test_run_names():
    assert report.split_overrides("a=1,b=[2,3],c='x,y'") == ["a=1", "b=[2,3]", "c='x,y'"]
    assert report.config_name("algorithm=gspo,seed=2,steps=6") == "algorithm=gspo,steps=6"
    assert report.config_name("seed=3") == "default"
    assert report.config_name("sweepA/algorithm=gspo,+seed=1") == "sweepA/algorithm=gspo"
    assert report.run_seed("algorithm=gspo,seed=2") == 2 and math.isnan(report.run_seed("algorithm=gspo"))
    assert report.short_labels(["a=1,b=2", "a=1,b=3"]) == {"a=1,b=2": "b=2", "a=1,b=3": "b=3"}


# ------------------------------------------------------------------------------ layout callback
def test_layout_callback_writes_to_tensorboard_and_noops_without_it(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layout = clip_fraction_layout()
    charts = layout["clip fractions"]
    assert [c for c in charts] == [f"{lvl} {k}" for lvl in ("token", "sequence") for k in ("low", "high", "region")]
    assert charts["sequence region"] == ["Multiline", ["^clip/seq_region$"]]

    cb = ClipFractionLayout()
    for loggers in ([], [CSVLogger(tmp_path / "csv")]):  # logger=none / another logger: nothing happens
        cb.on_train_start(SimpleNamespace(is_global_zero=True, loggers=loggers), None)
    assert cb.written == []
    tb = TensorBoardLogger(tmp_path, name="run", version="")
    cb.on_train_start(SimpleNamespace(is_global_zero=False, loggers=[tb]), None)  # rank != 0
    assert cb.written == []
    cb.on_train_start(SimpleNamespace(is_global_zero=True, loggers=[tb]), None)
    assert cb.written == [tb.log_dir]
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_layout_callback_with_logger_none_in_a_real_fit(tmp_path):
    """``logger=none``: the default callbacks (with the layout) still instantiate and fit runs."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.demos.boring_classes import BoringModel

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=["logger=none", f"output_dir={tmp_path}"])
    assert not cfg.logger and "clip_layout" in cfg.callbacks  # logger=none composes to an empty node
    cb = instantiate(cfg.callbacks.clip_layout)
    trainer = L.Trainer(logger=False, callbacks=[cb], max_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert trainer.global_step == 1 and cb.written == []
