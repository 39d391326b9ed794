"""The sampler and update benchmarks still run (on the tiny size, one repeat): they import the
shared setup of benchmarks/trl_work.py, and a rename there once broke one of them unnoticed.
Figures are not checked here (speed claims live in the benchmarks' own output), only that each
script runs and that its engines / forwards agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, RLOPT_BENCH_CACHE=str(tmp_path_factory.mktemp("bench-cache")), PYTHONWARNINGS="ignore",
                TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")


def _run(env, *args) -> str:
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_sampler_speed_runs_and_engines_agree(env):
    out = _run(env, BENCH / "sampler_speed.py", "--size", "tiny", "--repeats", "1")
    assert "identical tokens across engines: True" in out
    assert "shared prefix" in out and "HFGenerate" in out


def test_update_forward_runs(env):
    out = _run(env, BENCH / "update_forward.py", "--sizes", "tiny", "--repeats", "1")
    row = next(line for line in out.splitlines() if line.startswith("| tiny"))
    diff = float(row.rsplit("difference", 1)[1].strip(" )"))
    assert diff < 1e-4  # the four forwards' log-probs agree


def test_trl_compare_rlopt_worker_trains_in_bf16(env):
    """trl_compare's rlopt worker (the async pipeline) with ``--dtype bfloat16``: three steps run and
    are scored, the policy still in bf16 after them (the worker samples with a copy of it)."""
    path = _run(dict(env, PYTHONPATH=str(BENCH)), "-c", "from trl_work import prepare_model; "
                "print(prepare_model('tiny', 0))").strip().splitlines()[-1]
    out = _run(env, BENCH / "trl_compare.py", "--worker", "rlopt_async", "--size", "tiny", "--algo", "grpo",
               "--model-dir", path, "--steps", "3", "--threads", "1", "--worker-threads", "1", "--rlopt-staleness", "0",
               "--rlopt-correction", "bypass", "--dtype", "bfloat16", "--seed", "0", "--rlopt-rollout", "lean")
    res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert res["dtype"] == "torch.bfloat16"  # the policy trained in bf16, after the run
    assert len(res["rewards"]) == 3 and len(res["times"]) == 3
    assert all(0.0 <= r <= 1.0 for r in res["rewards"])


@pytest.mark.parametrize("rlopt_s, trl_s, verdict", [
    ([22.0, 24.0, 23.0], [10.0, 10.0, 10.0], "2x met"),  # every pair >= 2.2x: the interval is above 2
    ([18.0, 19.0, 18.5], [10.0, 10.0, 10.0], "2x not met"),  # every pair <= 1.9x: below 2
    ([18.0, 23.0, 18.0, 23.0], [10.0, 10.0, 10.0, 10.0], "2x unresolved"),  # 1.8x and 2.3x pairs straddle 2
])
def test_trl_compare_speed_verdict(env, rlopt_s, trl_s, verdict):
    """trl_compare's verdict on the samples/s ratio, from pairs whose ratios are known by hand."""
    code = ("import trl_compare as tc; runs = lambda xs: dict(runs=[dict(samples_s=x) for x in xs]); "
            f"tc.speed_ratios([dict(size='small', algo='grpo', rlopt_async=runs({rlopt_s}), trl=runs({trl_s}))], "
            "['rlopt_async'], 2.0)")
    out = _run(dict(env, PYTHONPATH=str(BENCH)), "-c", code)
    assert out.strip().endswith(verdict), out
