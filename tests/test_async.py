"""The asynchronous rollout pipeline (rlopt/rollout/pipeline.py, worker.py): bit-for-bit equal to
synchronous staleness in its deterministic mode, a free-running mode, and no worker left behind
or waited on forever when the run ends, fails, is interrupted or the worker dies."""

from __future__ import annotations

import os
import signal
import time

import lightning as L
import pytest
import torch

from rlopt.data import PromptDataModule, TaskSource
from rlopt.rollout.pipeline import RolloutWorkerError
from rlopt.tasks import ReverseTask

from .conftest import compose_train, fit

SMALL = ("steps=4", "group_size=2", "data.batch_size=4")


def _fit(tmp_path, *overrides, callbacks=()):
    cfg = compose_train(tmp_path, [*SMALL, *overrides])
    return fit(cfg, callbacks=list(callbacks))


def _comparable(history):
    return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in history]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped or exited worker is not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    """Live worker processes spawned by ``pid`` (from /proc; multiprocessing's resource tracker,
    which lives as long as its parent, is not one)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().split(")")[-1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z" and "spawn_main" in _cmdline(int(d)):
                out.append(int(d))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


# updates per rollout step u: the async batch t is sampled with the weights of the start of step
# t-1, i.e. u updates behind the policy that trains on it: synchronous staleness u
@pytest.mark.parametrize("minibatches", [1, 2])
def test_async_lag_one_equals_synchronous_staleness_bit_for_bit(tmp_path, minibatches):
    sync, _, _ = _fit(tmp_path / "sync", f"num_minibatches={minibatches}", f"offpolicy.staleness={minibatches}")
    asyn, _, _ = _fit(tmp_path / "async", f"num_minibatches={minibatches}", "offpolicy.async=true")
    assert [h["offpolicy/staleness_max"] for h in asyn.history] == [0.0] + [float(minibatches)] * 3
    assert _comparable(sync.history) == _comparable(asyn.history)
    for (name, p), q in zip(sync.policy.named_parameters(), asyn.policy.parameters()):
        assert torch.equal(p, q), name
    assert asyn.pipeline.process is None  # stopped at the end of fit
    assert asyn.history[-1]["perf/worker_sample_s"] > 0


def test_a_finished_run_resumed_for_more_steps_continues_exactly(tmp_path):
    """A run of 2 steps (its last step asks the worker for nothing) resumed to 4 steps gives the
    4-step run: the checkpoint of the last step still holds the weights batch 2 is sampled with."""
    straight, _, _ = _fit(tmp_path / "straight", "offpolicy.async=true", "scheduler=none")
    _fit(tmp_path / "first", "offpolicy.async=true", "scheduler=none", "steps=2", "callbacks=default",
         "checkpoint_every=1", "logger=none")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed, _, trainer = _fit(tmp_path / "resumed", "offpolicy.async=true", "scheduler=none", f"ckpt_path={ckpt}")
    assert trainer.global_step == 4 and ckpt.is_file()
    assert _comparable(resumed.history) == _comparable(straight.history)
    for a, b in zip(resumed.policy.parameters(), straight.policy.parameters()):
        assert torch.equal(a, b)


def test_the_worker_samples_in_rollout_dtype(tmp_path):
    """rollout.dtype=bfloat16: the worker's copy is cast (the trainer stays float32). Step 0's batch
    is sampled with the trainer's own weights, so its sampler-vs-policy log-prob gap is numerics
    alone: 0 with a float32 worker, ~6e-4 with a bfloat16 one (measured)."""
    module, _, trainer = _fit(tmp_path, "steps=2", "offpolicy.async=true", "rollout.dtype=bfloat16")
    assert trainer.global_step == 2 and next(module.policy.parameters()).dtype == torch.float32
    first = module.history[0]
    assert first["offpolicy/staleness_max"] == 0 and first["mismatch/logp_abs_diff_mean"] > 1e-4, first


def test_free_running_queue_stays_within_its_bound(tmp_path):
    module, _, trainer = _fit(tmp_path, "steps=6", "num_minibatches=1", "offpolicy.async=true", "offpolicy.max_lag=3")
    stale = [h["offpolicy/staleness_max"] for h in module.history]
    assert trainer.global_step == 6 and stale[0] == 0.0
    assert all(0 <= s <= 3 for s in stale), stale  # 1 update per step: staleness in steps = in updates
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_weights_go_through_a_free_slot_or_as_their_own_tensor():
    """Slot ``key % 3`` is reused only once the key that last filled it is released."""
    from rlopt.rollout.pipeline import AsyncRollouts

    class Box:  # stands in for the weights queue
        def __init__(self) -> None:
            self.got = []

        def put(self, msg) -> None:
            self.got.append(msg)

    pipe = AsyncRollouts(max_lag=1)
    pipe.slots, pipe.weights = [torch.zeros(4) for _ in range(3)], Box()
    w0, w3 = torch.arange(4.0), torch.arange(4.0) + 10
    pipe._send_weights(0, 5, w0)
    assert pipe.weights.got[-1] == (0, 5, 0) and torch.equal(pipe.slots[0], w0) and pipe.sent == {0: None}
    pipe._send_weights(3, 6, w3)  # slot 0 still holds key 0, which the worker may not have loaded
    key, version, flat = pipe.weights.got[-1]
    assert (key, version) == (3, 6) and flat is w3 and torch.equal(pipe.slots[0], w0) and pipe.sent[3] is w3
    del pipe.sent[0], pipe.sent[3]  # a batch sampled with a newer key came back: both released
    pipe._send_weights(6, 7, w3)
    assert pipe.weights.got[-1] == (6, 7, 0) and torch.equal(pipe.slots[0], w3)
    pipe._send_weights(1, 8, torch.zeros(5))  # another size (never from one policy): its own tensor
    assert torch.is_tensor(pipe.weights.got[-1][2])


def test_worker_copy_and_its_flat_weights(monkeypatch):
    """``prepare`` copies the policy (before sharding) and ``flat_weights`` follows the copy's own
    parameter order, tied weights once, so the worker's ``load_flat_`` reproduces the policy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlopt.rollout import pipeline as pl
    from rlopt.rollout.worker import load_flat_

    policy = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, tie_word_embeddings=True))
    assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight  # tied
    pipe = pl.AsyncRollouts()
    pipe.prepare(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))  # the copy is the structure; its values come with the weights
    flat = pipe.flat_weights(policy)
    assert torch.equal(flat, torch.nn.utils.parameters_to_vector(policy.parameters()))
    load_flat_(list(pipe.model.parameters()), flat)
    for (n, a), (m, b) in zip(policy.named_parameters(), pipe.model.named_parameters()):
        assert n == m and torch.equal(a, b), n
    monkeypatch.setattr(pl, "is_sharded", lambda model: True)
    with pytest.raises(ValueError, match=r"before sharding: AsyncRollouts.prepare\(policy\)"):
        pl.AsyncRollouts().prepare(policy)


def test_batch_at_is_the_loaders_kth_batch_across_epochs():
    dm = PromptDataModule(TaskSource(ReverseTask(), size=20), batch_size=6, seed=3)  # 3 batches an epoch
    dm.setup()
    seen = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        seen += [b["prompt"] for b in loader]
    assert len(seen) == 6 and seen[0] != seen[3]
    assert [dm.batch_at(k)["prompt"] for k in range(6)] == seen


class KillWorker(L.Callback):
    """SIGKILLs the rollout worker after rollout step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.pid = at, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at + 1:
            self.pid = pl_module.pipeline.process.pid
            os.kill(self.pid, signal.SIGKILL)


def test_a_dead_worker_is_an_error_naming_it_and_the_step(tmp_path):
    # killed after step 1: the batch of step 2 may already be sampled and sent (it is trained on),
    # so the first missing batch is that of step 2 or 3
    killer = KillWorker(at=1)
    t0 = time.perf_counter()
    with pytest.raises(RolloutWorkerError, match=r"rollout-worker \(pid \d+\) died with exit code -9 before handing "
                                                 r"over the batch of rollout step [23]"):
        _fit(tmp_path, "offpolicy.async=true", callbacks=[killer])
    assert time.perf_counter() - t0 < 120
    assert not _alive(killer.pid) and not children(os.getpid())


class FailingEngine:
    """A rollout engine that raises on its third batch (pickled into the worker)."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0
        self.dtype, self.temperature, self.max_new_tokens = engine.dtype, engine.temperature, engine.max_new_tokens

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 3:
            raise ValueError("the inference server is gone")
        return self.engine.generate(*args, **kwargs)


def test_an_error_in_the_worker_reaches_the_trainer_with_its_step(tmp_path, monkeypatch):
    from rlopt.rollout import pipeline

    real_start = pipeline.AsyncRollouts.start

    def start(self, policy, engine, *args):
        return real_start(self, policy, FailingEngine(engine), *args)

    monkeypatch.setattr(pipeline.AsyncRollouts, "start", start)
    with pytest.raises(RolloutWorkerError, match=r"(?s)failed while sampling the batch of rollout step 2.*"
                                                 r"the inference server is gone"):
        _fit(tmp_path, "offpolicy.async=true")
    assert not children(os.getpid())


class Stop(L.Callback):
    """Raises ``error`` after rollout step 1, recording the worker's pid first."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.pid = error, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pid = pl_module.pipeline.process.pid
        if self.error is not None and trainer.global_step == 2:
            raise self.error


@pytest.mark.parametrize("how", ["ends", "fails", "interrupted"])
def test_no_worker_is_left_behind(tmp_path, how):
    probe = Stop(RuntimeError("a bug in a callback") if how == "fails" else KeyboardInterrupt())
    if how == "ends":
        probe.error = None
        _fit(tmp_path, "offpolicy.async=true", callbacks=[probe])
    elif how == "fails":
        with pytest.raises(RuntimeError, match="a bug in a callback"):
            _fit(tmp_path, "offpolicy.async=true", callbacks=[probe])
    else:  # Lightning turns Ctrl+C into a graceful shutdown and sys.exit(1)
        with pytest.raises(SystemExit):
            _fit(tmp_path, "offpolicy.async=true", callbacks=[probe])
    assert probe.pid is not None and not _alive(probe.pid)
    assert not children(os.getpid())


def test_async_refuses_what_it_cannot_combine(tmp_path):
    with pytest.raises(ValueError, match="offpolicy.async=true cannot be combined with offpolicy.staleness"):
        _fit(tmp_path, "offpolicy.async=true", "offpolicy.staleness=1")
    for key in ("max_lag", "worker_threads", "trainer_threads"):  # each named in its error
        with pytest.raises(ValueError, match=f"offpolicy.{key}"):
            _fit(tmp_path, "offpolicy.async=true", f"offpolicy.{key}=0")


def test_borrowed_threads_while_the_worker_idles(tmp_path):
    """offpolicy.borrow_threads: the update takes the worker's threads once everything asked for
    has come back, and gives them back when the next step asks the worker again (and at the end)."""
    from collections import deque

    from rlopt.rollout.pipeline import AsyncRollouts

    class Results:
        def __init__(self) -> None:
            self.n = 0

        def qsize(self) -> int:
            return self.n

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pipe = AsyncRollouts(worker_threads=1, borrow_threads=True)
        pipe.own_threads, pipe.process, pipe.results, pipe.inflight = 1, object(), Results(), deque([(3, ["p"])])
        pipe.lend_idle_threads()
        assert torch.get_num_threads() == 1 and not pipe.borrowed  # the worker is still sampling step 3
        pipe.results.n = 1
        pipe.lend_idle_threads()
        assert torch.get_num_threads() == 2 and pipe.borrowed
        pipe._return_threads()
        assert torch.get_num_threads() == 1 and not pipe.borrowed
        pipe.inflight.clear()  # nothing asked for (the last step): the worker idles
        pipe.lend_idle_threads()
        assert torch.get_num_threads() == 2 and pipe.borrowed
        pipe._return_threads()
        # inside the update too: before each decoder block's forward, after each gradient accumulates
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2))
        pipe._watch(model)
        pipe.inflight, pipe.results.n = deque([(4, ["p"])]), 0
        loss = model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()
        assert torch.get_num_threads() == 1  # still sampling during the forward
        pipe.results.n = 1  # ... and done before the backward
        loss.backward()
        assert torch.get_num_threads() == 2 and pipe.borrowed
        pipe._return_threads()
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert torch.get_num_threads() == 2  # a forward checks as well
        pipe.process = None  # (a stand-in: nothing to stop)
        pipe.close()
        assert torch.get_num_threads() == 1 and not pipe.hooks
        pipe.process = object()
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert torch.get_num_threads() == 1  # closed: the hooks are gone
        pipe.borrow_threads = False
        pipe.lend_idle_threads()
        assert torch.get_num_threads() == 1  # off by default
        module, _, trainer = _fit(tmp_path, "steps=3", "offpolicy.async=true", "offpolicy.borrow_threads=true",
                                  "offpolicy.trainer_threads=1")
        assert trainer.global_step == 3 and module.pipeline.borrow_threads and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_too_little_shared_memory_is_refused_before_the_worker_starts(tmp_path, monkeypatch):
    from rlopt.rollout import pipeline

    monkeypatch.setattr(pipeline, "shared_memory_free", lambda path="/dev/shm": 1024)
    with pytest.raises(ValueError, match=r"shared memory for the weights \(max_lag \+ 2 = 3 copies.*--shm-size"):
        _fit(tmp_path, "offpolicy.async=true")
    assert children(os.getpid()) == []  # refused before spawning


def test_trainer_threads_sets_this_process_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        cfg = compose_train(tmp_path, [*SMALL, "offpolicy.async=true", "offpolicy.trainer_threads=2"])
        from rlopt.train import build

        module, _, _ = build(cfg)
        assert torch.get_num_threads() == 2 and module.pipeline.worker_threads == 1
    finally:
        torch.set_num_threads(before)
