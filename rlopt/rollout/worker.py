"""The rollout worker: a process that only samples (the other half of rollout/pipeline.py).

    ctx = torch.multiprocessing.get_context("spawn")
    proc = ctx.Process(target=serve, args=(model, engine, eos, pad, threads, jobs, weights, results, os.getpid(), slots))

It owns a copy of the policy (in ``rollout.dtype`` when set) and its own thread budget, and
answers three kinds of message, all through ``torch.multiprocessing`` queues (small arrays travel
by value; a tensor would travel as a shared-memory handle, each of which costs a socket round trip):

- ``weights`` queue: ``(key, version, flat)``: the policy's parameters as one flat tensor, sent
  by the trainer at the start of rollout step ``key`` (``version`` = optimizer updates applied);
  ``flat`` is the index of one of the shared-memory ``slots`` handed over at spawn, which the
  trainer filled and does not overwrite before the worker has moved past ``key``, or a tensor
  of its own (when every slot is still in use);
- ``jobs`` queue: ``(step, prompt_ids, prompt_mask, num_samples, seed, want, exact)``: sample the
  batch of rollout step ``step`` with the global torch seed set to ``seed``, using exactly the
  weights sent under key ``want`` (``exact``: the deterministic mode) or the newest received, at
  least as new as ``want`` (the free-running mode: the bound on staleness holds even when a
  message is still in flight); the prompts as numpy arrays; ``None`` stops the worker;
- ``results`` queue (answers): ``("done", step, key, version, arrays, seconds)``, ``arrays`` the
  ``Completions`` as numpy arrays (``to_arrays`` / ``from_arrays``: small tensors travel faster by
  value than as shared-memory handles, each of which costs a socket round trip), or
  ``("error", step, traceback)``.

It ignores SIGINT (the trainer handles Ctrl+C and stops it) and exits by itself within a second
of its parent disappearing (a trainer killed with SIGKILL cannot stop it), so no worker outlives
its run.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from typing import Any

import torch
from torch import Tensor

POLL_S = 0.5  # how often a waiting worker checks that its parent is still alive


def to_arrays(c: Any) -> tuple:
    """A ``Completions`` as a tuple of numpy arrays (None kept), in field order."""
    return tuple(None if t is None else t.detach().cpu().numpy() for t in c.tensors())


def from_arrays(arrays: tuple) -> Any:
    from .base import Completions

    return Completions(*(None if a is None else torch.from_numpy(a) for a in arrays))


@torch.no_grad()
def load_flat_(params: list[Tensor], flat: Tensor) -> None:
    """Copy a flat parameter vector (``torch.nn.utils.parameters_to_vector`` order) into ``params``,
    converting to each parameter's dtype (``copy_``, as ``BehaviourCopy.refresh`` does)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset:offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"weights of {flat.numel()} values for a model of {offset} parameters")


def _get(q: Any, parent: int) -> Any:
    """``q.get()``, but return ``None`` (stop) once the parent process is gone."""
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def serve(model: torch.nn.Module, engine: Any, eos_token_id: Any, pad_token_id: int, threads: int,
          jobs: Any, weights: Any, results: Any, parent: int, slots: list[Tensor] = ()) -> None:
    """The worker's main loop (runs in the spawned process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(int(threads))
    model.eval().requires_grad_(False)
    params = list(model.parameters())
    key, version = None, None  # the weights loaded now
    while True:
        job = _get(jobs, parent)
        if job is None:
            return
        step, prompt_ids, prompt_mask, num_samples, seed, want, exact = job
        try:
            newest, have = None, key
            while have is None or have < want:  # the weights sent under `want` are on their way (FIFO)
                newest = _get(weights, parent)
                if newest is None:
                    return
                have = newest[0]
            if not exact:  # free-running: anything newer that has arrived as well
                while True:
                    try:
                        newest = weights.get_nowait()
                    except queue.Empty:
                        break
            if newest is not None:
                key, version, flat = newest
                load_flat_(params, slots[flat] if isinstance(flat, int) else flat)
                del flat, newest
            torch.manual_seed(int(seed))
            t0 = time.perf_counter()
            out = engine.generate(model, torch.from_numpy(prompt_ids), torch.from_numpy(prompt_mask), num_samples,
                                  eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id)
            results.put(("done", step, key, version, to_arrays(out), time.perf_counter() - t0))
        except BaseException:  # noqa: BLE001 - reported to the trainer, which raises it with the step
            results.put(("error", step, traceback.format_exc()))
            return
