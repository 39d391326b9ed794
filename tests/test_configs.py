"""The Hydra configs: every YAML composes and instantiates, the Python presets and the algorithm
configs agree, hybrids override the algorithm's defaults, and bad configs fail before any model
is loaded with an error naming the key."""

from __future__ import annotations

import glob
import json
import os

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rlopt.algorithms import (
    AdvantageEstimator, Aggregation, ClipStrategy, DiscountedReturn, GroupBaseline,
    PPOClip, RatioScheme, SeqMeanTokenMean, SeqMeanTokenSumNorm, SequenceRatio, TokenMean,
    TokenRatio, WeightClip, build_preset, preset_names,
)
from rlopt.conf import _run_name, check_config
from rlopt.rollout import RolloutEngine
from rlopt.train import CONFIG_DIR, build

from .conftest import compose_train

GROUP_OPTIONS = sorted(
    (os.path.basename(os.path.dirname(p)), os.path.splitext(os.path.basename(p))[0])
    for p in glob.glob(os.path.join(CONFIG_DIR, "*", "*.yaml"))
)
ALGORITHMS = sorted(o for g, o in GROUP_OPTIONS if g == "algorithm")


def _params(obj) -> dict:
    return {k: v for k, v in obj.params().items()}


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# --- every YAML composes and its node instantiates ---------------------------------------------

def _check_components(cfg, group, base):
    obj = instantiate(cfg[group])
    assert isinstance(obj, base)
    parts = check_config(cfg)  # the whole composition is valid too
    assert type(parts[group]) is type(obj) and vars(parts[group]) == vars(obj)
    return obj


def _advantage(cfg, option, tmp_path):
    est = _check_components(cfg, "advantage", AdvantageEstimator)
    est.check_group_size(cfg.group_size)


def _ratio(cfg, option, tmp_path):
    _check_components(cfg, "ratio", RatioScheme)


def _clip(cfg, option, tmp_path):
    _check_components(cfg, "clip", ClipStrategy)


def _aggregation(cfg, option, tmp_path):
    agg = _check_components(cfg, "aggregation", Aggregation)
    if isinstance(agg, SeqMeanTokenSumNorm):  # Dr. GRPO: the constant length is the generation budget
        assert agg.max_len == cfg.rollout.max_new_tokens == 4


def _rollout(cfg, option, tmp_path):
    eng = _check_components(cfg, "rollout", RolloutEngine)
    assert eng.max_new_tokens == 4  # the debug preset's budget


def _kl(cfg, option, tmp_path):
    obj = check_config(cfg)["objective"]
    assert obj.kl_name == cfg.kl.estimator and obj.kl_coef == cfg.kl.coef
    assert obj.needs_reference == (option == "k3")


def _entropy(cfg, option, tmp_path):
    assert check_config(cfg)["objective"].entropy_coef == cfg.entropy.coef


def _correction(cfg, option, tmp_path):
    obj = check_config(cfg)["objective"]
    assert type(obj.correction).__name__ == cfg.correction._target_.rsplit(".", 1)[1]
    assert obj.needs_sampler_logp == (option != "none")


def _masks(cfg, option, tmp_path):
    obj = check_config(cfg)["objective"]
    assert set(obj.masks) == set(cfg.masks or {})
    for name, m in obj.masks.items():
        assert type(m).__name__ == cfg.masks[name]._target_.rsplit(".", 1)[1]


def _algorithm(cfg, option, tmp_path):
    check_config(cfg)
    assert cfg.algorithm_name == option


def _model(cfg, option, tmp_path):
    """model=tiny builds and loads the embedded model. Any other model option is loaded with its own
    settings but name_or_path pointed at a local tiny-model folder (the real from_pretrained path on
    local files; a hub id would need a network)."""
    if option != "tiny":
        if OmegaConf.is_missing(cfg.model, "name_or_path"):
            with pytest.raises(MissingMandatoryValue):  # e.g. model=hf: name_or_path is required
                instantiate(cfg.model)
        from rlopt.tiny import build_tiny

        folder = build_tiny(str(tmp_path / "local_model"))
        cfg = compose_train(tmp_path / "run_local", [f"model={option}", f"model.name_or_path={folder}"])
    model, tok = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module) and model.config.model_type == "llama"
    ids = tok("abc>", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids).logits
    assert out.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(out).all()
    if option == "tiny":
        assert os.path.exists(os.path.join(cfg.output_dir, "tiny_model", "config.json"))


def _task(cfg, option, tmp_path):
    """Instantiate the sources (a FileSource with a missing path gets a small jsonl written here),
    load rows, and score each row's reference answer with every configured reward."""
    files = []
    for split in ("train", "val"):
        node = cfg.task.get(split)
        if node is not None and "path" in node.keys() and OmegaConf.is_missing(node, "path"):
            with pytest.raises(MissingMandatoryValue):
                instantiate(node)
            col = node.get("prompt_column") or "prompt"
            rows = [{col: f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
            files.append(f"task.{split}.path={_write_jsonl(tmp_path / f'{split}.jsonl', rows)}")
    if files:
        cfg = compose_train(tmp_path / "run_files", [f"task={option}", *files])
    train = instantiate(cfg.task.train).load()
    assert train and "prompt" in train[0] and "answer" in train[0]
    if cfg.task.val is not None:
        val = instantiate(cfg.task.val).load()
        assert val and "prompt" in val[0]
        if not files:  # procedural tasks: disjoint splits
            assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}
    rows = train[:4]
    prompts, refs = [r["prompt"] for r in rows], [str(r["answer"]) for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    for name, node in cfg.task.rewards.items():
        scores = instantiate(node)(prompts, refs, completion_lengths=[1] * len(rows), **columns)
        assert len(scores) == len(rows), name
        if name in ("match", "correct"):  # the reference answer scores full marks
            assert all(s == 1.0 for s in scores), (name, scores)
    if cfg.task.get("accuracy_fn"):
        assert instantiate(cfg.task.accuracy_fn)(prompts, refs, **columns) == [1.0] * len(rows)
    assert set(cfg.task.get("reward_weights") or {}) <= set(cfg.task.rewards)


def _optimizer(cfg, option, tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = instantiate(cfg.optimizer)([p])
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == cfg.optimizer.lr


def _scheduler(cfg, option, tmp_path):
    if option == "none":
        assert not cfg.get("scheduler")
        return
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sch = instantiate(cfg.scheduler)(opt)
    assert isinstance(sch, torch.optim.lr_scheduler.LRScheduler)
    if option == "cosine":
        assert sch.T_max == cfg.steps == 2


def _trainer(cfg, option, tmp_path):
    assert cfg.trainer.max_steps == cfg.steps == 2
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy):  # a strategy object (FSDP: auto-wrap classes etc.) builds on any machine
        assert instantiate(strategy) is not None
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        pytest.skip(f"trainer={option} composes (checked above) but a Trainer with accelerator=gpu "
                    "cannot be instantiated on a machine without CUDA")
    overrides = {}
    devices = cfg.trainer.devices
    if cfg.trainer.accelerator == "auto" and isinstance(devices, int) and 0 < torch.cuda.device_count() < devices:
        overrides["accelerator"] = "cpu"  # auto would pick the GPU(s), too few for `devices`
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], **overrides)
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == 2
    if isinstance(devices, int):
        assert trainer.num_devices == devices
    if option == "ddp":
        assert "ddp" in type(trainer.strategy).__name__.lower()


def _logger(cfg, option, tmp_path):
    if option == "none":
        assert not cfg.get("logger")
        return
    lg = instantiate(cfg.logger)
    assert lg.name == "test" and os.path.abspath(lg.save_dir) == os.path.abspath(cfg.output_dir)


def _callbacks(cfg, option, tmp_path):
    cbs = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    assert all(isinstance(c, L.Callback) for c in cbs)
    if option == "default":
        from lightning.pytorch.callbacks import ModelCheckpoint

        ck = next(c for c in cbs if isinstance(c, ModelCheckpoint))
        assert ck._every_n_train_steps == cfg.checkpoint_every
        assert os.path.abspath(ck.dirpath) == os.path.abspath(os.path.join(cfg.output_dir, "checkpoints"))
    else:
        assert cbs == []


def _experiment(cfg, option, tmp_path):
    check_config(cfg)
    for src in (cfg.task.train, cfg.task.val):
        if src is not None:
            assert instantiate(src).load()
    if option.endswith("_offpolicy"):
        assert cfg.num_minibatches > 1 and cfg.algorithm_name == option.split("_")[0]


def _debug(cfg, option, tmp_path):
    check_config(cfg)
    assert cfg.steps == 2 and cfg.trainer.max_steps == 2


HANDLERS = {
    "advantage": _advantage, "ratio": _ratio, "clip": _clip, "aggregation": _aggregation, "rollout": _rollout,
    "kl": _kl, "entropy": _entropy, "correction": _correction, "masks": _masks, "algorithm": _algorithm, "model": _model, "task": _task, "optimizer": _optimizer,
    "scheduler": _scheduler, "trainer": _trainer, "logger": _logger, "callbacks": _callbacks,
    "experiment": _experiment, "debug": _debug,
}


def test_every_config_group_is_covered():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert groups == set(HANDLERS), f"config groups without a test handler: {groups - set(HANDLERS)}"
    train = OmegaConf.load(os.path.join(CONFIG_DIR, "train.yaml"))
    in_defaults = {next(iter(d)) for d in train.defaults if not isinstance(d, str)}
    assert groups <= in_defaults, f"config groups not in train.yaml's defaults: {groups - in_defaults}"


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_yaml_composes_and_instantiates(group, option, tmp_path):
    # (model=hf / task=jsonl compose with their ??? value unset; the handlers then set it)
    cfg = compose_train(tmp_path / "run", [f"{group}={option}"])  # on top of debug=default
    assert cfg.hydra.runtime.choices[group] == option
    HANDLERS[group](cfg, option, tmp_path)


def test_run_name_is_the_sanitised_overrides(tmp_path):
    cfg = compose_train(tmp_path, ["task=jsonl", "task.train.path=/data/x.jsonl", "algorithm=gspo"], run_name=None)
    dirname = cfg.hydra.job.override_dirname
    assert "algorithm=gspo" in dirname and "/data/x.jsonl" in dirname
    assert cfg.run_name == _run_name(dirname) == dirname.replace("/", "_")
    assert "/" not in cfg.run_name and str(tmp_path) not in dirname


# --- the Python presets and the Hydra algorithm configs agree ----------------------------------

def test_every_algorithm_config_is_a_preset():
    assert set(preset_names()) == set(ALGORITHMS)


@pytest.mark.parametrize("name", preset_names())
def test_preset_and_yaml_build_identical_components(name, tmp_path):
    cfg = compose_train(tmp_path, [f"algorithm={name}"])
    parts = check_config(cfg)
    advantage, objective = build_preset(name)
    yaml_obj = parts["objective"]
    pairs = {
        "advantage": (advantage, parts["advantage"]),
        "ratio": (objective.ratio, yaml_obj.ratio),
        "clip": (objective.clip, yaml_obj.clip),
        "aggregation": (objective.aggregation, yaml_obj.aggregation),
    }
    for part, (py, yml) in pairs.items():
        assert type(py) is type(yml), (part, py, yml)
        p, y = _params(py), _params(yml)
        if isinstance(py, SeqMeanTokenSumNorm):
            # Dr. GRPO: the YAML sets max_len to ${rollout.max_new_tokens} (the generation budget);
            # the Python preset leaves it None (= the padded width T, the same value when every batch
            # is padded to the budget). Compared apart from it.
            assert p.pop("max_len") is None
            assert y.pop("max_len") == cfg.rollout.max_new_tokens
        assert p == y, (part, p, y)
    assert (objective.kl_name, objective.kl_coef, objective.entropy_coef) == \
        (yaml_obj.kl_name, yaml_obj.kl_coef, yaml_obj.entropy_coef)
    assert type(objective.correction) is type(yaml_obj.correction)
    assert _params(objective.correction) == _params(yaml_obj.correction)
    assert {k: (type(m), _params(m)) for k, m in objective.masks.items()} == \
        {k: (type(m), _params(m)) for k, m in yaml_obj.masks.items()}


# --- hybrids: a command-line override beats the algorithm's defaults list ----------------------

@pytest.mark.parametrize("overrides,expect", [
    (["algorithm=gspo", "ratio=token"],
     {"ratio": TokenRatio, "clip": (PPOClip, {"eps_low": 3e-4, "eps_high": 4e-4}), "advantage": GroupBaseline,
      "aggregation": SeqMeanTokenMean, "kl": None}),
    (["advantage=discounted_return", "ratio=sequence"],  # on the default algorithm (grpo)
     {"ratio": SequenceRatio, "advantage": DiscountedReturn, "clip": (PPOClip, {"eps_low": 0.2, "eps_high": 0.2}),
      "aggregation": SeqMeanTokenMean, "kl": "k3"}),
    (["algorithm=dapo", "clip=weight"],
     {"clip": (WeightClip, {"eps_low": 0.2, "eps_high": 0.2}), "ratio": TokenRatio, "advantage": GroupBaseline,
      "aggregation": TokenMean, "kl": None}),
], ids=["gspo+ratio=token", "discounted_return+ratio=sequence", "dapo+clip=weight"])
def test_hybrid_overrides_beat_the_algorithm_defaults(overrides, expect, tmp_path):
    cfg = compose_train(tmp_path, overrides)
    parts = check_config(cfg)
    obj = parts["objective"]
    got = {"advantage": parts["advantage"], "ratio": obj.ratio, "clip": obj.clip, "aggregation": obj.aggregation}
    for part, want in expect.items():
        if part == "kl":
            assert obj.kl_name == want
            continue
        cls, params = want if isinstance(want, tuple) else (want, {})
        assert type(got[part]) is cls, (part, got[part])
        for k, v in params.items():
            assert got[part].params()[k] == pytest.approx(v), (part, k)


# --- pre-flight validation: fails before any model is loaded, naming the key -------------------

BAD_CONFIGS = [
    (["group_size=1"], ["group_size"]),
    (["clip.eps_low=1.0"], ["clip", "eps_low"]),
    (["algorithm=gspo", "clip.eps_low=1.0"], ["clip", "eps_low"]),
    (["num_minibatches=3"], ["num_minibatches"]),  # debug: 2 prompts x group 2 = 4 completions
    (["ppo_epochs=0"], ["ppo_epochs"]),
    (["num_minibatches=0"], ["num_minibatches"]),
    (["steps=0"], ["steps"]),
    (["data.batch_size=0"], ["data.batch_size"]),
    (["micro_batch_size=0"], ["micro_batch_size"]),
    (["kl.estimator=null", "kl.coef=0.1"], ["kl", "kl_coef > 0", "KL estimator"]),
    (["kl.estimator=k9"], ["kl", "k9", "k3"]),
    (["advantage.scale=sideways"], ["advantage", "sideways"]),
    (["rollout.temperature=0"], ["rollout", "temperature"]),
    (["task.rewards=null"], ["task.rewards"]),
]


@pytest.mark.parametrize("overrides,keys", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_fails_before_model_load(overrides, keys, compose_cfg, no_model_load):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError) as e:
        build(cfg)
    for k in keys:
        assert k in str(e.value), (k, str(e.value))
    assert no_model_load == []
    assert not os.path.exists(os.path.join(cfg.output_dir, "tiny_model"))


def test_bad_config_leaves_no_tiny_model_dir_without_monkeypatch(compose_cfg):
    cfg = compose_cfg("group_size=1")
    with pytest.raises(ValueError, match="group_size"):
        build(cfg)
    assert not os.path.exists(os.path.join(cfg.output_dir, "tiny_model"))


def test_unknown_algorithm_lists_the_choices(tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(tmp_path, ["algorithm=no_such_algo"])
    msg = str(e.value)
    assert "no_such_algo" in msg
    for name in ALGORITHMS:
        assert name in msg


def test_the_shipped_sweeps_join_the_users_overrides():
    """rlopt-train adds the sweeps folder to Hydra's search path next to the user's overrides, so
    Hydra's parser (one run of overrides) still takes options after them (``--cfg job``)."""
    from rlopt.train import sweeps_dir, with_shipped_sweeps

    path = f"hydra.searchpath=[file://{sweeps_dir()}]"
    argv = with_shipped_sweeps(["--config-name", "staleness", "size=quick", "seed=1", "--cfg", "job"])
    assert argv == ["--config-dir", sweeps_dir(), "--config-name", "staleness", path, "size=quick", "seed=1",
                    "--cfg", "job"]
    assert with_shipped_sweeps(["--info", "config", "seed=1"]) == ["--info", "config", path, "seed=1"]
    assert with_shipped_sweeps(["-m"]) == ["-m", path]
    assert with_shipped_sweeps(["seed=1", "hydra.searchpath=[file:///x]"]) == ["seed=1", "hydra.searchpath=[file:///x]"]
