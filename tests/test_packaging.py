"""The wheel: built from this checkout, installed into a fresh virtual environment (no editable
install, no checkout on the path), it runs the main job's code path and a sweep from an empty
folder. The new environment reuses this one's third-party packages through a ``.pth`` line (so
nothing is downloaded), but imports rlopt only from the installed wheel: the test checks that."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": os.environ.get("PATH", "")}
SMALL = ("debug=default", "task.train.size=64", "task.val.size=4", "export_dir=null")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    dist, src = base / "dist", base / "src"
    # build from a copy: an in-tree build/ folder would keep files of modules that no longer exist
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info",
                                                             "outputs", "multirun", "__pycache__", ".trl-venv", ".cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = dist.glob("rlopt-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # third-party packages from this environment; its editable rlopt finder is not a .pth of this site
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return env_dir


def _run(env_dir: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "rlopt-train"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_holds_rlopt_configs_and_sweeps(wheel_env, tmp_path):
    code = ("import rlopt, rlopt.resources as r; print(rlopt.__file__); print(r.config_dir()); print(r.sweeps_dir())")
    out = subprocess.run([str(wheel_env / "bin" / "python"), "-c", code], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(str(wheel_env) in p for p in out), out  # rlopt, its configs and sweeps: from the wheel only
    assert str(REPO) not in " ".join(out)
    assert Path(out[1], "train.yaml").is_file() and Path(out[1], "algorithm", "grpo.yaml").is_file()
    assert Path(out[2], "grpo_vs_gspo.yaml").is_file() and Path(out[2], "size", "quick.yaml").is_file()


def test_two_rollout_steps_from_an_empty_folder(wheel_env, tmp_path):
    proc = _run(wheel_env, tmp_path, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rlopt] 2 steps" in proc.stdout and "algorithm grpo:" in proc.stdout


def test_a_two_run_sweep_from_an_empty_folder(wheel_env, tmp_path):
    # the shipped sweep by name (no --config-dir), through its joblib launcher
    proc = _run(wheel_env, tmp_path, "--config-name", "grpo_vs_gspo", "-m", "algorithm=grpo", "seed=0,1",
                "num_minibatches=2", *SMALL, "steps=2", "val_every=2", "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert runs == ["0", "1"] and not list((tmp_path / "sweep").glob("*/FAILED.txt"))
    assert "joblib.parallel" in (proc.stdout + proc.stderr).lower()  # the sweep's own launcher ran it
