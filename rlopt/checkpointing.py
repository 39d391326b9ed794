"""Checkpoints that survive crashes: atomic writes, safe loading, a checkpoint on SIGTERM.

    Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(...), PreemptionCheckpoint()])

``AtomicCheckpointIO`` writes to a temporary file in the same folder, fsyncs it, then renames it
over the target (``os.replace`` is atomic on POSIX): a kill during a write leaves the previous
checkpoint intact. It loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
``PreemptionCheckpoint`` saves ``last.ckpt`` at the end of the step in which SIGTERM arrived and
stops the run cleanly (Lightning alone would only stop at the end of the epoch).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM: save ``<dirpath>/last.ckpt`` after the current step, then stop."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.saved: str | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.saved is not None:
            return
        got = bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:  # signals reach ranks at different steps; saving is collective (FSDP)
            got = trainer.strategy.reduce_boolean_decision(got, all=False)
        if got:
            self.saved = os.path.join(self.dirpath, "last.ckpt")
            trainer.save_checkpoint(self.saved)
            trainer.should_stop = True
