"""Reliability: exact resume after SIGKILL, checkpoint on SIGTERM, atomic checkpoint writes,
safe loading, non-finite updates skipped, bad input rejected before work starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlopt.algorithms import build_preset
from rlopt.checkpointing import AtomicCheckpointIO
from rlopt.data import PromptDataModule, TaskSource
from rlopt.module import NonFiniteError, PolicyOptModule
from rlopt.rewards import RewardSet, partial_match
from rlopt.rollout import HFGenerate
from rlopt.tasks import ReverseTask
from rlopt.tiny import build_tiny

from .test_async import _alive, children

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
TRAIN_ARGS = ["debug=default", "steps=40", "val_every=1000", "checkpoint_every=1", "logger=none",
              "trainer.enable_progress_bar=false", "export_dir=null", "rollout.max_new_tokens=6"]


def _train(out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlopt.train", *TRAIN_ARGS, f"output_dir={out}",
                             f"hydra.run.dir={out}", *extra], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _state(ckpt: str) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in history]


@pytest.mark.parametrize("extra", [(), ("offpolicy.staleness=2", "num_minibatches=2"),
                                   ("offpolicy.async=true", "num_minibatches=2")], ids=["default", "stale", "async"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, extra):
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    ref = _train(ref_dir, *extra)
    cut = _train(cut_dir, *extra)
    ckdir = os.path.join(cut_dir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and cut.poll() is None:  # kill once a mid-run checkpoint exists
        if any(f.startswith("epoch=0-step=") and int(f.split("step=")[1].split(".")[0]) >= 6
               for f in (os.listdir(ckdir) if os.path.isdir(ckdir) else [])):
            break
        time.sleep(0.05)
    assert cut.poll() is None, "the run ended before it could be killed:\n" + cut.stdout.read()
    workers = children(cut.pid)  # offpolicy.async: its rollout worker
    assert len(workers) == ("offpolicy.async=true" in extra)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    gone = time.time() + 10  # an orphaned worker notices its parent is gone and exits
    while time.time() < gone and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "the rollout worker outlived its killed trainer"
    killed_at = _state(os.path.join(ckdir, "last.ckpt"))["global_step"]
    print("killed at step", killed_at, sorted(os.listdir(ckdir)))
    assert 3 <= killed_at < 40
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    resumed = _train(cut_dir, *extra, f"ckpt_path={ckdir}/last.ckpt")
    out2, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out2
    a = _state(os.path.join(ref_dir, "checkpoints", "last.ckpt"))
    b = _state(os.path.join(ckdir, "last.ckpt"))
    assert a["global_step"] == b["global_step"] == 40
    # per-step metrics of the whole run (the resumed run's first part comes from its checkpoint)
    assert _comparable(a["rlopt"]["history"]) == _comparable(b["rlopt"]["history"])
    for k, v in a["state_dict"].items():  # bit-exact final weights on CPU
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    out_dir = str(tmp_path / "run")
    proc = _train(out_dir, "steps=100000")
    ckdir = os.path.join(out_dir, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(ckdir) and os.listdir(ckdir)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    state = _state(os.path.join(ckdir, "last.ckpt"))
    assert 0 < state["global_step"] < 100000
    assert len(state["rlopt"]["history"]) == state["global_step"]


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *a, **k):  # a crash half-way through writing
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed during write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def test_checkpoints_load_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)


# ----------------------------------------------------------------------------- in-process module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _module(tiny_dir, objective=None, **kw):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    adv, obj = build_preset("dapo")
    return PolicyOptModule(model, tok, adv, objective or obj, RewardSet({"match": partial_match}),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), rollout=HFGenerate(max_new_tokens=4),
                           group_size=2, **kw)


def _dm(size=64, **kw):
    task = ReverseTask()
    return PromptDataModule(TaskSource(task, size), None, batch_size=2, **kw)


def _trainer(steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, **kw)


class _PoisonedObjective:
    """Wraps an objective and makes its loss NaN on chosen calls."""

    def __init__(self, inner, poison_calls):
        self.inner, self.poison, self.calls = inner, set(poison_calls), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *a, **k):
        loss, m = self.inner(*a, **k)
        self.calls += 1
        return (loss * float("nan") if self.calls in self.poison else loss), m


def test_nonfinite_update_is_skipped_and_counted(tmp_path, tiny_dir):
    _, obj = build_preset("dapo")
    module = _module(tiny_dir, objective=_PoisonedObjective(obj, {1}))
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = _trainer(1)
    trainer.fit(module, datamodule=_dm())
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN update changed the weights"
    assert module.optimizers().optimizer.state == {} or all(
        len(s) == 0 for s in module.optimizers().optimizer.state.values()), "optimizer state was touched"
    assert module.skipped_updates == 1
    assert module.history[-1]["train/skipped_updates"] == 1.0
    module2 = _module(tiny_dir, objective=_PoisonedObjective(obj, {3}))
    _trainer(3).fit(module2, datamodule=_dm())
    assert module2.skipped_updates == 1 and all(torch.isfinite(p).all() for p in module2.policy.parameters())


def test_consecutive_nonfinite_updates_stop_the_run(tiny_dir):
    _, obj = build_preset("dapo")
    module = _module(tiny_dir, objective=_PoisonedObjective(obj, range(1, 100)), max_consecutive_skips=3)
    with pytest.raises(NonFiniteError, match="3 consecutive updates"):
        _trainer(10).fit(module, datamodule=_dm())


def test_extreme_log_ratios_stay_finite():
    _, obj = build_preset("grpo")
    logp = torch.tensor([[-1e4, 0.0, -3.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1e4, -3.0]])
    loss, m = obj(logp, old, torch.ones(1, 3), torch.ones(1, 3), ref_logp=torch.zeros(1, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_bf16_log_ratio_is_computed_in_float32():
    from rlopt.algorithms import TokenRatio

    logp = torch.tensor([[-2.0001]], dtype=torch.bfloat16)
    ratio, lr = TokenRatio()(logp, torch.tensor([[-2.0]], dtype=torch.bfloat16), torch.ones(1, 1))
    assert lr.dtype == torch.float32 and ratio.dtype == torch.float32


def test_prompt_longer_than_context_fails_before_training(tmp_path, tiny_dir):
    module = _module(tiny_dir)
    long_task = ReverseTask(min_len=140, max_len=140)  # the tiny model's context is 128
    dm = PromptDataModule(TaskSource(long_task, 8), None, batch_size=2)
    with pytest.raises(ValueError, match="exceeds the model's context of 128 tokens"):
        _trainer(1).fit(module, datamodule=dm)
    assert module.global_step == 0


def test_missing_pad_token_is_set_from_eos(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = None
    assert tok.pad_token_id is None
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adv, obj = build_preset("grpo")
    module = PolicyOptModule(model, tok, adv, obj, RewardSet({"m": partial_match}))
    assert module.tokenizer.pad_token_id == tok.eos_token_id


def test_data_without_prompt_column_is_rejected(tmp_path):
    from rlopt.data import FileSource

    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "1+1=", "answer": "2"}\n')
    with pytest.raises(ValueError, match="no column 'prompt'"):
        FileSource(str(f)).load()
    rows = FileSource(str(f), prompt_column="question").load()
    assert rows[0]["prompt"] == "1+1="
