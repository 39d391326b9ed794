"""Off-policyness as an experimental dial: sample with the weights of ``k`` optimizer updates ago.

    stale = StaleWeights(staleness=2)
    stale.push(version, policy)                 # after every optimizer update (and once at the start)
    version, params = stale.for_sampling()      # the weights k updates behind the newest, and their version

``offpolicy.staleness=k`` keeps the last ``k + 1`` snapshots of the policy's parameters (``k``
extra copies of the weights: fine for small models, a memory cost for large ones) and the module
samples each rollout batch with the oldest of them, through the behaviour copy
(``rollout/base.py``). Synchronous and deterministic: the same seed gives the same run, and the
snapshots travel in checkpoints so a resumed run continues exactly. While fewer than ``k``
updates have been made, sampling uses the initial weights (staleness below ``k``). The
sampler's log-probs are those of the stale weights: mu is the stale policy, pi_old the current
one (recomputed), and the behaviour-correction axis (``correction=tis`` ...) corrects between them.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from ..algorithms.registry import check_range


class StaleWeights:
    def __init__(self, staleness: int = 0) -> None:
        self.staleness = int(check_range("offpolicy.staleness", staleness, low=0))
        self.snapshots: deque[tuple[int, list[Tensor]]] = deque(maxlen=self.staleness + 1)

    @torch.no_grad()
    def push(self, version: int, policy: torch.nn.Module) -> None:
        """Record the policy's parameters as ``version`` (the number of updates applied to them)."""
        if self.staleness:
            self.snapshots.append((int(version), [p.detach().clone() for p in policy.parameters()]))

    def for_sampling(self) -> tuple[int, list[Tensor]]:
        """The oldest kept snapshot: ``staleness`` updates behind the newest once enough were made."""
        if not self.snapshots:
            raise RuntimeError("no weights recorded yet: push the initial weights before the first rollout")
        return self.snapshots[0]

    def state_dict(self) -> dict:
        return {"staleness": self.staleness, "snapshots": [(v, [p.cpu() for p in ps]) for v, ps in self.snapshots]}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.snapshots.clear()
        for v, ps in state.get("snapshots", []):
            self.snapshots.append((int(v), [p.to(device) if device is not None else p for p in ps]))


class BehaviourWeights:
    """Which weights sample a training batch, and their version: the policy itself, or (with
    ``rollout.dtype`` and/or ``offpolicy.staleness``) the sampler's own copy (``BehaviourCopy``)
    loaded with the current or a stale snapshot of the parameters.

        bw = BehaviourWeights(dtype=None, staleness=1)
        bw.start(policy)                 # once before training: the initial weights are version 0
        model = bw.model_for(policy)     # before sampling a training batch (bw.sampled_version: its version)
        bw.updated(policy)               # after every applied optimizer update
    """

    def __init__(self, dtype: str | None = None, staleness: int = 0) -> None:
        from .base import BehaviourCopy

        self.copy = BehaviourCopy(dtype)
        self.stale = StaleWeights(staleness)
        self.version = 0  # optimizer updates applied to the policy so far
        self.sampled_version = 0  # the version that sampled the latest training batch

    @property
    def separate(self) -> bool:
        """Sampling uses a copy of the weights, not the policy itself."""
        return self.copy.dtype is not None or bool(self.stale.staleness)

    def start(self, policy: torch.nn.Module) -> None:
        if self.stale.staleness and not self.stale.snapshots:
            self.stale.push(self.version, policy)

    def updated(self, policy: torch.nn.Module) -> None:
        self.version += 1
        self.stale.push(self.version, policy)

    def model_for(self, policy: torch.nn.Module) -> torch.nn.Module:
        self.sampled_version, params = self.version, None
        if not self.separate:
            return policy
        if self.stale.staleness:
            self.sampled_version, params = self.stale.for_sampling()
        return self.copy.refresh(policy, params)

    def state_dict(self) -> dict:
        return {"version": self.version, "stale": self.stale.state_dict()}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.version = int(state.get("version", 0))
        if "stale" in state:
            self.stale.load_state_dict(state["stale"], device)
