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
