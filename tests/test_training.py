"""End-to-end training on the tiny model through the real Hydra configs (debug preset):
every algorithm preset on- and off-policy, hybrids, resume, bad rewards, export, TensorBoard,
and a pure-Python research script."""

from __future__ import annotations

import glob
import math
import os

import lightning as L
import pytest
import torch

from rlopt.algorithms import (
    DiscountedReturn, GroupBaseline, PPOClip, SequenceRatio, TokenMean, TokenRatio, WeightClip, build_preset,
)
from rlopt.rewards import RewardError
from rlopt.train import CONFIG_DIR, run

from .conftest import Probe, fit, logged

ALGORITHMS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "algorithm", "*.yaml")))
# A completion-dependent extra reward: an untrained model scores ~0 on the task, so without it every
# group would have zero reward variance, zero advantages and no update at all.
HASH_REWARD = "+task.rewards.hash={_target_:tests.conftest.reward_hash,_partial_:true}"


def _policy(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in _policy(a))


# --- every preset trains ------------------------------------------------------------------------

OFF_POLICY = ["grpo", "gspo", "gspo_token", "dapo", "cispo"]  # num_minibatches=2: updates on stale samples


@pytest.mark.parametrize("algorithm,num_minibatches", [(a, 1) for a in ALGORITHMS] + [(a, 2) for a in OFF_POLICY],
                         ids=[a for a in ALGORITHMS] + [f"{a}-minibatches=2" for a in OFF_POLICY])
def test_every_algorithm_trains_two_steps(algorithm, num_minibatches, compose_cfg):
    cfg = compose_cfg(f"algorithm={algorithm}", f"num_minibatches={num_minibatches}", HASH_REWARD)
    probe = Probe()
    module, _, trainer = fit(cfg, callbacks=[probe])
    assert trainer.global_step == 2 and probe.end_step == 2
    metrics = logged(trainer)
    for key in ("reward/mean", "loss/total", "ratio/mean", "grad/norm", "advantage/std", "val/reward_greedy"):
        assert key in metrics, key
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, bad
    assert metrics["advantage/std"] > 0  # the hash reward separates the completions of a group
    assert _changed(probe.start_state, probe.end_state), "no update was applied to the policy"
    assert module.objective.needs_reference == (cfg.kl.estimator is not None and cfg.kl.coef > 0)
    if num_minibatches == 1:
        assert module.on_policy
        if not module.objective.needs_old_logp_pass and not module.objective.correction.replaces_old_logp:
            # on-policy without an old-log-prob pass: the ratio is exactly 1
            assert metrics["ratio/min"] == metrics["ratio/max"] == metrics["ratio/mean"] == 1.0
        else:  # pi_old from its own pass (or mu under bypass): 1 up to float rounding / the sampler's numerics
            assert abs(metrics["ratio/mean"] - 1.0) < 1e-3, metrics["ratio/mean"]
    else:
        # off-policy: the 2nd minibatch is scored against the old log-probs of the pre-update policy
        assert not module.on_policy
        assert metrics["ratio/min"] < 1.0 or metrics["ratio/max"] > 1.0, metrics


# --- hybrids compose and train with the overridden components -----------------------------------

@pytest.mark.parametrize("overrides,check", [
    (["algorithm=gspo", "ratio=token"],
     lambda adv, obj: type(obj.ratio) is TokenRatio and isinstance(obj.clip, PPOClip) and obj.clip.eps_high == 4e-4),
    (["advantage=discounted_return", "ratio=sequence"],
     lambda adv, obj: type(adv) is DiscountedReturn and type(obj.ratio) is SequenceRatio and obj.kl_name == "k3"),
    (["algorithm=dapo", "clip=weight"],
     lambda adv, obj: type(obj.clip) is WeightClip and obj.clip.eps_low == 0.2 and type(obj.aggregation) is TokenMean
     and type(adv) is GroupBaseline),
], ids=["gspo+ratio=token", "discounted_return+ratio=sequence", "dapo+clip=weight"])
def test_hybrids_train(overrides, check, compose_cfg):
    module, _, trainer = fit(compose_cfg(*overrides, HASH_REWARD))
    assert trainer.global_step == 2
    assert check(module.advantage, module.objective), (module.advantage, module.objective)
    assert all(math.isfinite(v) for v in logged(trainer).values())


# --- resume ---------------------------------------------------------------------------------------

def test_resume_continues_from_the_checkpoint(tmp_path, compose_cfg):
    # scheduler=none: the default cosine (T_max = steps = 2) reaches lr 0 at step 2, and the resume
    # restores that scheduler state (its T_max included), so step 3 would not move the weights
    first = compose_cfg("callbacks=default", "checkpoint_every=1", HASH_REWARD, "scheduler=none",
                        "+callbacks.probe={_target_:tests.conftest.Probe}", output_dir=tmp_path / "first")
    assert run(first)["steps"] == 2
    probe1 = Probe.last
    ckpt = os.path.join(first.output_dir, "checkpoints", "last.ckpt")
    assert os.path.exists(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert _changed(probe1.start_state, saved["state_dict"]), "the saved weights should differ from the start"
    for k, v in _policy(probe1.end_state).items():
        assert torch.equal(v, saved["state_dict"][k]), k

    # a fresh run folder (a new tiny model) resumed from the checkpoint, one more step
    second = compose_cfg("callbacks=default", "checkpoint_every=1", HASH_REWARD, "scheduler=none", "steps=3",
                         f"ckpt_path={ckpt}",
                         "+callbacks.probe={_target_:tests.conftest.Probe}", output_dir=tmp_path / "second")
    assert second.trainer.max_steps == 3
    summary = run(second)
    probe2 = Probe.last
    assert probe2 is not probe1
    assert probe2.start_step == 2 and probe2.end_step == 3 and summary["steps"] == 3
    # the module's weights after the resume-load are the saved ones (policy and frozen reference)
    for k, v in saved["state_dict"].items():
        assert torch.equal(probe2.start_state[k], v), k
    assert _changed(probe2.start_state, probe2.end_state)
    final = torch.load(os.path.join(second.output_dir, "checkpoints", "last.ckpt"), map_location="cpu",
                       weights_only=False)
    assert final["global_step"] == 3


# --- bad rewards --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,words", [
    ("reward_wrong_length", ["5 values for 4 completions"]),
    ("reward_nan", ["nan"]),
    ("reward_raises", ["KeyError", "no such column"]),
    ("reward_non_numeric", ["non-numeric", "great"]),
])
def test_bad_reward_fails_the_run_naming_the_function(fn, words, compose_cfg):
    cfg = compose_cfg(f"+task.rewards.broken={{_target_:tests.conftest.{fn},_partial_:true}}")
    with pytest.raises(RewardError) as e:
        fit(cfg)
    msg = str(e.value)
    assert "'broken'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_nan_rewards_skipped_are_counted(compose_cfg):
    cfg = compose_cfg("reward_nan_policy=skip", HASH_REWARD,
                      "+task.rewards.flaky={_target_:tests.conftest.reward_nan_every_other,_partial_:true}")
    _, _, trainer = fit(cfg)
    assert trainer.global_step == 2
    m = logged(trainer)
    assert m["reward/invalid"] == pytest.approx(0.5)  # every other completion
    assert all(math.isfinite(v) for v in m.values()), m


# --- export -----------------------------------------------------------------------------------

def test_export_reloads_with_transformers_and_generates(tmp_path, compose_cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "export"
    cfg = compose_cfg(f"export_dir={export}", HASH_REWARD, "+callbacks.probe={_target_:tests.conftest.Probe}")
    summary = run(cfg)
    assert os.path.abspath(summary["export_dir"]) == os.path.abspath(export)
    model = AutoModelForCausalLM.from_pretrained(str(export))
    tok = AutoTokenizer.from_pretrained(str(export))
    trained = _policy(Probe.last.end_state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[f"policy.{k}"]), k
    enc = tok(["abc>", "fedcb>"], return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] > enc["input_ids"].shape[1]
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts) and any(texts)


# --- TensorBoard --------------------------------------------------------------------------------

REQUIRED_TAGS = [
    "reward/mean", "reward/std", "clip/token_low", "clip/token_high", "clip/token_region", "clip/seq_region",
    "ratio/mean", "ratio/min", "ratio/max", "kl/mean", "entropy/mean", "advantage/mean", "advantage/std",
    "completion/length_mean", "completion/length_max", "completion/truncated", "reward/zero_std_groups",
    "grad/norm", "lr", "perf/samples_per_s", "perf/tokens_per_s", "val/reward_greedy",
]


def _read_tb(log_dir: str):
    from tbparse import SummaryReader

    assert glob.glob(os.path.join(log_dir, "events.out.tfevents.*")), os.listdir(log_dir)
    return SummaryReader(log_dir)


def test_tensorboard_logs_scalars_text_and_histograms(compose_cfg):
    cfg = compose_cfg("logger=tensorboard", "log_samples_every=1", "algorithm=grpo", HASH_REWARD)
    summary = run(cfg)
    assert os.path.abspath(summary["log_dir"]) == os.path.abspath(os.path.join(cfg.output_dir, "test"))
    reader = _read_tb(summary["log_dir"])
    scalars = reader.scalars
    tags = set(scalars.tag)
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    assert not missing, f"missing TensorBoard scalars: {missing}; have {sorted(tags)}"
    steps = sorted(scalars[scalars.tag == "reward/mean"].step)
    assert len(steps) == 2  # one point per rollout step
    assert scalars.value.map(math.isfinite).all()
    text = reader.text
    assert (text.tag == "samples").all() and sorted(text.step) == steps  # aligned with the scalars
    assert "| prompt | completion | reward |" in text.value.iloc[0]
    hist = reader.histograms
    assert set(hist.tag) == {"ratio/token_hist"} and sorted(hist.step) == steps


def test_tensorboard_histogram_on_the_sample_logging_steps(compose_cfg):
    """log_samples_every=2 over 2 rollouts: text and ratio histogram both at the first rollout's step
    (the ratios must be kept on the same rollouts whose samples are logged)."""
    cfg = compose_cfg("logger=tensorboard", "log_samples_every=2", "algorithm=gspo", "num_minibatches=2", HASH_REWARD)
    reader = _read_tb(run(cfg)["log_dir"])
    first = min(reader.scalars[reader.scalars.tag == "reward/mean"].step)
    assert set(reader.text.step) == {first}
    assert not reader.histograms.empty, "the ratio histogram was not logged"
    assert set(reader.histograms.step) == {first}


# --- GPU trainer configs (skipped without CUDA) ------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="trainer=gpu / fsdp need a CUDA device")
@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_trains_on_gpu(trainer, compose_cfg):
    probe = Probe()
    _, _, tr = fit(compose_cfg(f"trainer={trainer}", "trainer.devices=1", "num_minibatches=2", HASH_REWARD),
                   callbacks=[probe])
    assert tr.global_step == 2 and probe.device.type == "cuda"  # (Lightning moves it back to CPU after fit)
    metrics = logged(tr)
    assert all(math.isfinite(v) for v in metrics.values()), metrics


# --- a research script: pure Python, no Hydra --------------------------------------------------

def test_research_script_without_hydra(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlopt.data import PromptDataModule, TaskSource
    from rlopt.module import PolicyOptModule
    from rlopt.rewards import RewardSet, partial_match
    from rlopt.rollout import HFGenerate
    from rlopt.tasks import ReverseTask

    from .conftest import reward_hash

    L.seed_everything(0, verbose=False)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    advantage, objective = build_preset("gspo")
    module = PolicyOptModule(policy, tokenizer, advantage, objective,
                             rewards=RewardSet({"match": partial_match, "hash": reward_hash}),
                             rollout=HFGenerate(max_new_tokens=4), group_size=2, num_minibatches=2)
    dm = PromptDataModule(TaskSource(ReverseTask(), size=32), batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert len(module.reward_history) == 2 and all(math.isfinite(r) for r in module.reward_history)


def test_log_entropy_switch(compose_cfg):
    # log_entropy=false skips the per-token entropy (no softmax over the vocabulary per update)
    on, _, _ = fit(compose_cfg("algorithm=dapo"))
    off, _, _ = fit(compose_cfg("algorithm=dapo", "log_entropy=false"))
    assert "entropy/mean" in on.history[-1] and "entropy/mean" not in off.history[-1]
