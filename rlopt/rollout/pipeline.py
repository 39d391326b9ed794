"""Asynchronous rollouts: a worker process samples the next batch while the trainer updates.

    pipe = AsyncRollouts(max_lag=1, worker_threads=1)             # offpolicy.async=true
    pipe.prepare(policy)                                          # before sharding (configure_model)
    pipe.start(policy, engine, group_size, tokenizer, datamodule, encode, seed_at, last_step)
    flat = pipe.flat_weights(policy)                              # gathered when sharded: every rank
    ro, version = pipe.completions(step, prompts, flat, version)   # once per rollout step
    pipe.close()                                                  # CloseWorker does it on end / error

At rollout step ``t`` the trainer sends the worker its current weights (one flat tensor, through
shared memory), asks it for the batch of step ``t + 1`` (``datamodule.batch_at(t + 1)``: the data
module's batch ``k`` is a function of ``(seed, k)``), and only then waits for batch ``t``, which the worker
sampled during step ``t - 1``: generation of one batch overlaps the update on the previous one.

- ``max_lag=1`` (deterministic): batch ``t`` is sampled with exactly the weights of the start of
  step ``t - 1`` and the sampling seed ``seed_at(t)``: the run is the synchronous run with
  ``offpolicy.staleness`` = optimizer updates per rollout step, bit for bit (same thread count),
  and a resumed run continues it exactly (``state_dict`` holds the weights of the batch in flight).
- ``max_lag=L > 1`` (free-running): up to ``L`` batches are queued ahead; the worker samples each
  with the newest weights it has received when it starts it, so a batch is 1 to ``L`` steps stale
  depending on timing (logged per step as ``offpolicy/staleness_*``; not reproducible bit for bit).

The engine contract (a remote inference server can take the worker's place): docs/off-policy.md.
"""

from __future__ import annotations

import copy
import os
import queue
from collections import deque
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor

from ..algorithms.registry import check_range
from ..distributed import flat_parameters, is_sharded
from ..models import decoder_layer_classes
from .base import Completions
from .worker import POLL_S, from_arrays, serve


class RolloutWorkerError(RuntimeError):
    """The rollout worker died or failed; the message names it and the rollout step."""


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system (None where there is none to ask)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_shared_memory(need: int, max_lag: int) -> None:
    """Refuse to start when the weight slots would not fit in shared memory (writing past its end
    kills the process with SIGBUS instead of raising)."""
    free = shared_memory_free()
    if free is not None and free < need:
        raise ValueError(f"offpolicy.async needs {need / 2**20:.0f} MiB of shared memory for the weights "
                         f"(max_lag + 2 = {max_lag + 2} copies of the parameters), but /dev/shm has "
                         f"{free / 2**20:.0f} MiB free: enlarge it (docker run --shm-size=...) or lower offpolicy.max_lag")


class AsyncRollouts:
    def __init__(self, max_lag: int = 1, worker_threads: int = 1, borrow_threads: bool = False,
                 name: str = "rollout-worker") -> None:
        self.max_lag = int(check_range("offpolicy.max_lag", max_lag, low=1))
        self.worker_threads = int(check_range("offpolicy.worker_threads", worker_threads, low=1))
        self.borrow_threads = bool(borrow_threads)
        self.own_threads = torch.get_num_threads()  # the trainer's own (set at start)
        self.borrowed = False
        self.name = name
        self.process: Any = None
        self.inflight: deque[tuple[int, list[str]]] = deque()  # (step, prompts) asked for, not yet received
        self.sent: dict[int, Tensor | None] = {}  # keys sent, possibly not yet loaded (slot kept / tensor kept)
        self.slots: list[Tensor] = []  # shared-memory buffers the weights travel through
        self.resume: tuple[int, int, Tensor] | None = None  # (key, version, flat) of the batch in flight
        self.next_step = 0  # free-running: the next step to ask for
        self.gen_seconds = 0.0  # the worker's sampling time of the latest batch received
        self.model: torch.nn.Module | None = None  # the worker's unsharded copy of the policy (prepare)
        self.names: list[str] = []  # its parameters' names, in the order the flat weights follow
        self.hooks: list[Any] = []  # borrow_threads: the checks inside the policy's forward and backward

    @property
    def deterministic(self) -> bool:
        return self.max_lag == 1

    # ------------------------------------------------------------------------------- lifecycle
    def prepare(self, policy: torch.nn.Module) -> None:
        """Take the worker's copy of ``policy`` (and its parameter names) while it is still unsharded:
        ``PolicyOptModule.configure_model`` calls it before FSDP shards the policy; ``start`` calls it
        too (a no-op once a copy is held). Under FSDP each rank's worker samples with a whole
        model, loaded from weights gathered by ``flat_weights``."""
        if self.model is not None:
            return
        if is_sharded(policy):
            raise ValueError("offpolicy.async=true with sharded weights (FSDP) needs the worker's copy taken before "
                             "sharding: AsyncRollouts.prepare(policy) before fully_shard / FSDP(...) "
                             "(PolicyOptModule.configure_model does it)")
        self.model = copy.deepcopy(policy).requires_grad_(False)
        self.names = [n for n, _ in policy.named_parameters()]

    def flat_weights(self, policy: torch.nn.Module) -> Tensor:
        """``policy``'s parameters as the one flat tensor the worker loads (its own parameter order);
        under FSDP gathered from the shards: a collective, every rank calls it."""
        return flat_parameters(policy, self.names)

    def start(self, policy: torch.nn.Module, engine: Any, group_size: int, tokenizer: Any, datamodule: Any,
              encode: Callable[[list[str]], tuple[Tensor, Tensor]], seed_at: Callable[[int], int],
              last_step: int | None) -> None:
        """Spawn the worker with a copy of ``policy`` (in ``engine.dtype`` when set); it will sample
        ``group_size`` completions of each prompt of ``datamodule.batch_at(k)``, encoded by ``encode``,
        with the global seed ``seed_at(k)``, up to rollout step ``last_step`` (None: no end)."""
        if not hasattr(datamodule, "batch_at"):
            raise ValueError("offpolicy.async=true needs a data module whose batch k is a function of (seed, k) "
                             "(PromptDataModule.batch_at)")
        self.close()
        self.prepare(policy)
        self.group_size, self.encode, self.seed_at, self.last_step = int(group_size), encode, seed_at, last_step
        self.prompts_at = lambda k: datamodule.batch_at(k)["prompt"]
        model = self.model
        if not is_sharded(policy):  # taken again from the policy at the next start (no copy held meanwhile)
            self.model = None
        # on the trainer's device (the copy may predate Lightning's move to it), in rollout.dtype when set
        dtype = getattr(engine, "dtype", None)
        model.to(device=next(policy.parameters()).device, dtype=None if dtype is None else getattr(torch, dtype))
        ctx = torch.multiprocessing.get_context("spawn")  # fork is unsafe with OpenMP / CUDA already running
        self.jobs, self.weights, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        # weights travel through a few shared-memory slots, handed over once (a fresh tensor per
        # step would cost a shared-memory segment and a socket round trip each time)
        first = next(policy.parameters())
        numel = sum(p.numel() for p in policy.parameters())
        check_shared_memory(numel * first.element_size() * (self.max_lag + 2), self.max_lag)
        self.slots = [torch.empty(numel, dtype=first.dtype).share_memory_() for _ in range(self.max_lag + 2)]
        self.process = ctx.Process(target=serve, name=self.name, daemon=True, args=(
            model, engine, tokenizer.eos_token_id, tokenizer.pad_token_id, self.worker_threads, self.jobs, self.weights,
            self.results, os.getpid(), self.slots))
        self.process.start()
        self.own_threads, self.borrowed = torch.get_num_threads(), False
        if self.borrow_threads:
            self._watch(policy)
        self.inflight.clear()
        self.sent.clear()
        self.next_step = 0

    def close(self) -> None:
        """Stop the worker (asked, then terminated, then killed) and release the queues; idempotent."""
        self._return_threads()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            self.jobs.put(None)
            proc.join(timeout=5)
        finally:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
            for q in (self.jobs, self.weights, self.results):
                q.cancel_join_thread()  # never block interpreter exit on unsent tensors
                q.close()
            self.inflight.clear()
            self.sent.clear()

    # ------------------------------------------------------------------------------- one step
    def completions(self, step: int, prompts: list[str], weights: Tensor, version: int
                    ) -> tuple[Completions, int]:
        """The batch of rollout ``step`` (whose prompts must be ``prompts``) and the version of the
        weights that sampled it; first hands the worker ``weights`` (version ``version``, the
        trainer's now) and the next batch(es) to sample."""
        if self.process is None:
            raise RolloutWorkerError(f"{self.name} is not running (start() it before rollout step {step})")
        self._return_threads()  # the worker is about to sample again
        if self.deterministic:
            if not self.inflight:  # first step of this process: the batch of `step` was never asked for
                key, ver, flat = self.resume if self.resume is not None else (step - 1, version, weights)
                self._send_weights(key, ver, flat)
                self._ask(step, want=key, exact=True)
            if self.last_step is None or step + 1 <= self.last_step:
                self._send_weights(step, version, weights)
                self._ask(step + 1, want=step, exact=True)
            # also at the last step: a run resumed with more steps samples batch step + 1 with them
            self.resume = (step, version, weights)
        else:
            self._send_weights(step, version, weights)
            self.next_step = max(self.next_step, step)
            while self.next_step <= step + self.max_lag and (self.last_step is None or self.next_step <= self.last_step):
                self._ask(self.next_step, want=step, exact=False)
                self.next_step += 1
        return self._receive(step, prompts)

    def lend_idle_threads(self) -> None:
        """``borrow_threads``: once the worker has handed in everything asked for (it idles until
        the next step), this process takes its threads too; ``completions`` gives them back. The
        module calls it between the update's passes, and the hooks of ``_watch`` inside them. Changes the thread count mid-update, so the arithmetic
        (and the bit-for-bit equality with synchronous staleness) depends on timing."""
        if not self.borrow_threads or self.borrowed or self.process is None:
            return  # (nothing in flight, as in the last step: the worker idles)
        try:
            done = self.results.qsize() >= len(self.inflight)
        except NotImplementedError:  # macOS: no sem_getvalue
            return
        if done:
            torch.set_num_threads(self.own_threads + self.worker_threads)
            self.borrowed = True

    def _watch(self, policy: torch.nn.Module) -> None:
        """``borrow_threads``: ask ``lend_idle_threads`` before every decoder block's forward and after
        each parameter's gradient is accumulated too, so the update takes the idle worker's threads
        within a block's work of the worker finishing (between micro-batches alone it could run a
        whole micro-batch's forward and backward on its own threads, ~1 s on trl_compare's small)."""
        blocks = tuple(decoder_layer_classes(policy))
        check = lambda *_: self.lend_idle_threads()  # noqa: E731 - a hook's signature, ignored
        for m in policy.modules():
            if isinstance(m, blocks):
                self.hooks.append(m.register_forward_pre_hook(check))
        for p in policy.parameters():
            if p.requires_grad:
                self.hooks.append(p.register_post_accumulate_grad_hook(check))

    def _return_threads(self) -> None:
        if self.borrowed:
            torch.set_num_threads(self.own_threads)
            self.borrowed = False

    def _send_weights(self, key: int, version: int, flat: Tensor) -> None:
        """Into slot ``key % len(slots)`` unless a key still in use holds it (the worker is past a
        key once a batch sampled with a newer one has come back); else as a tensor of its own."""
        slot = key % len(self.slots)
        buf = self.slots[slot]
        free = not any(k % len(self.slots) == slot and k != key for k in self.sent)
        if free and buf.dtype == flat.dtype and buf.numel() == flat.numel():
            buf.copy_(flat.detach().view(-1).cpu())
            self.sent[key] = None
            self.weights.put((key, int(version), slot))
        else:
            self.sent[key] = flat  # kept alive until the worker has loaded it
            self.weights.put((key, int(version), flat))

    def _ask(self, step: int, want: int, exact: bool) -> None:
        prompts = list(self.prompts_at(step))
        ids, mask = self.encode(prompts)
        self.jobs.put((step, ids.cpu().numpy(), mask.cpu().numpy(), self.group_size, int(self.seed_at(step)), want,
                       exact))
        self.inflight.append((step, prompts))

    def _receive(self, step: int, prompts: list[str]) -> tuple[Completions, int]:
        if not self.inflight or self.inflight[0][0] != step:
            raise RuntimeError(f"{self.name}: rollout step {step} was not asked for "
                               f"(in flight: {[k for k, _ in self.inflight]})")
        while True:
            try:
                msg = self.results.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise self._died(step) from None
            except (ConnectionError, EOFError, OSError) as e:  # its tensors' handles died with it
                self.process.join(timeout=POLL_S)
                raise self._died(step) from e
        if msg[0] == "error":
            raise RolloutWorkerError(f"{self.name} failed while sampling the batch of rollout step {msg[1]}:\n{msg[2]}")
        _, got, key, version, arrays, seconds = msg
        _, asked = self.inflight.popleft()
        if got != step or asked != list(prompts):
            raise RuntimeError(f"{self.name}: the batch of rollout step {step} differs from the one the worker sampled "
                               "(the data module's batch k must be a function of (seed, k): PromptDataModule.batch_at)")
        for k in [k for k in self.sent if k < key]:  # loaded (or skipped) by the worker: release
            del self.sent[k]
        self.gen_seconds = float(seconds)
        return from_arrays(arrays), int(version)

    def _died(self, step: int) -> RolloutWorkerError:
        return RolloutWorkerError(f"{self.name} (pid {self.process.pid}) died with exit code {self.process.exitcode} "
                                  f"before handing over the batch of rollout step {step}")

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The weights of the batch in flight (deterministic mode), so a resumed run samples it again."""
        if not self.deterministic or self.resume is None:
            return {}
        key, version, flat = self.resume
        return {"key": key, "version": version, "weights": flat.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.resume = (int(state["key"]), int(state["version"]), state["weights"])


class CloseWorker(L.Callback):
    """Stops the rollout worker when fit ends, fails or is interrupted (the module adds it)."""

    def __init__(self, pipeline: AsyncRollouts) -> None:
        self.pipeline = pipeline

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.pipeline.close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.pipeline.close()
