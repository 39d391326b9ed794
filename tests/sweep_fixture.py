"""A tiny REAL sweep shared by tests/test_report.py and tests/test_notebooks.py.

``tiny_sweep`` runs the documented one-command sweep (``rlopt-train
--config-name grpo_vs_gspo -m``, here as ``python -m rlopt.train``) as a subprocess with
debug-like sizes: algorithm grpo / gspo x seed 0, 1, 6 rollout steps of 2 prompts x 2
completions, 2 minibatches (off-policy), through the joblib launcher (2 worker processes). A
third seed value, ``oops``, is not an integer: those two runs fail at start-up, write
``FAILED.txt`` and the sweep goes on. The sweep is built once per test session (the fixture is
imported by two modules; ``build_tiny_sweep`` caches it) and takes about 30 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "sweeps"

# debug-like sizes (configs/debug/default.yaml + the reverse task's sizes), off-policy minibatches
TINY = ("size=quick", "debug=default", "steps=6", "val_every=6", "num_minibatches=2", "group_size=2",
        "data.batch_size=2", "rollout.max_new_tokens=4", "task.train.size=64", "task.val.size=4",
        "export_dir=null")
GOOD_SEEDS, BAD_SEED = ("0", "1"), "oops"
ALGORITHMS = ("grpo", "gspo")

_built: dict[str, Path] = {}


def run_sweep(config_name: str, sweep_dir: Path, overrides: tuple[str, ...] | list[str] = (),
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``rlopt-train --config-dir sweeps --config-name <config_name> -m <overrides>`` into ``sweep_dir``."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlopt.train", "--config-dir", str(SWEEPS), "--config-name", config_name, "-m",
           *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def build_tiny_sweep(base: Path) -> Path:
    if "tiny" not in _built:
        sweep_dir = base / "tiny_sweep"
        proc = run_sweep("grpo_vs_gspo", sweep_dir, (*TINY, f"algorithm={','.join(ALGORITHMS)}",
                                                       f"seed={','.join((*GOOD_SEEDS, BAD_SEED))}"))
        if proc.returncode != 0:
            raise RuntimeError(f"the tiny sweep failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        _built["tiny"] = sweep_dir
    return _built["tiny"]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """The folder of the tiny sweep (4 finished runs, 2 failed ones)."""
    return build_tiny_sweep(tmp_path_factory.getbasetemp())
