"""Scale-out on the CPU: DDP and FSDP2 (ModelParallelStrategy + fully_shard) with 2 gloo processes.

All 2-process scenarios run in ONE ``torchrun`` launch (tests/distributed_worker.py; start-up and
imports dominate on a small machine); the tests below read its results. The single-process
references of the exactness tests run in this process on the same fixed rollout batch.

- DDP and FSDP2 each train 2 steps with GRPO and with GSPO through ``rlopt.train.run`` (configs
  trainer=ddp / trainer=fsdp2), export a consolidated ``save_pretrained`` policy and checkpoint.
- Exactness: for every loss aggregation (with 2 minibatches, micro-batches of 3 rows and batch-std
  advantages) and for on-policy GRPO, one SGD step on a fixed batch split over 2 ranks changes the
  weights as one process holding the whole batch does (relative difference < 1e-5).
- FSDP2 resume: continues at step 2 with the saved weights and ends where an uninterrupted run ends.
- Sharded generation where the ranks stop after different numbers of tokens (``synced_gpus``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from .distributed_worker import EXACT, SCENARIOS, compose, exact_overrides, fit_fixed

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT = 900
REL_TOL = 1e-5


class Runs:
    def __init__(self, out: Path, results: list[dict], log: str, returncode: int | None) -> None:
        self.out, self.results, self.log, self.returncode = out, results, log, returncode

    def get(self, name: str) -> dict:
        """Rank 0's result of a scenario; fails the test with every rank's error if one failed."""
        errors = [f"rank {r}:\n{res[name]['error']}" for r, res in enumerate(self.results)
                  if isinstance(res.get(name), dict) and "error" in res[name]]
        if errors:
            pytest.fail(f"scenario {name} failed\n" + "\n".join(errors))
        if not self.results or name not in self.results[0]:
            pytest.fail(f"scenario {name} did not run (worker exit code {self.returncode}); log tail:\n{self.log[-6000:]}")
        return self.results[0][name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed_worker", str(out), *SCENARIOS]
    log_path = out / "worker.log"
    code = None
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=WORKER_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            pass
    results = [torch.load(out / f"results-{r}.pt", weights_only=False) if (out / f"results-{r}.pt").exists() else {}
               for r in range(2)]
    return Runs(out, results, log_path.read_text(errors="replace"), code)


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors."""
    assert set(a) == set(b), set(a) ^ set(b)
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def _update(res: dict) -> dict[str, torch.Tensor]:
    return {k: res["end"][k] - res["start"][k] for k in res["end"]}


def _changed(res: dict) -> bool:
    return any(not torch.equal(res["start"][k], res["end"][k]) for k in res["end"])


# --- training through the configs -------------------------------------------------------------------

@pytest.mark.parametrize("trainer,algorithm", [("ddp", "grpo"), ("ddp", "gspo"), ("fsdp2", "grpo"), ("fsdp2", "gspo")])
def test_trains_two_steps(runs, trainer, algorithm):
    res = runs.get(f"train_{trainer}_{algorithm}")
    info = res["info"]
    assert res["start_step"] == 0 and res["end_step"] == 2 and res["summary"]["steps"] == 2
    assert info["world_size"] == 2 and info["checkpoint_io"] == "AtomicCheckpointIO"
    assert info["strategy"] == {"ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[trainer]
    sharded = trainer == "fsdp2"
    assert info["dtensor_params"] == sharded and info["synced_generation"] == sharded
    if sharded and algorithm == "grpo":
        assert info["ref_dtensor_params"], "the frozen reference model should be sharded too"
    assert _changed(res), "no update was applied"
    assert len(res["history"]) == 2
    for h in res["history"]:
        assert {"reward/mean", "loss/total", "grad/norm", "advantage/std", "kl/mean" if algorithm == "grpo" else "ratio/mean"} <= set(h)
        assert all(math.isfinite(v) for v in h.values()), h
    assert "val/reward_greedy" in res["summary"]["val"]


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_asynchronous_rollouts(runs, trainer):
    # each rank's worker samples the rank's share of batch t+1 during step t: steps 1 and 2 train on
    # data sampled before the previous step's updates (num_minibatches=4 of the default: 4 updates stale)
    res = runs.get(f"train_{trainer}_async")
    assert res["end_step"] == 3 and _changed(res)
    assert [h["offpolicy/staleness_max"] for h in res["history"]] == [0.0, 4.0, 4.0]
    assert all(math.isfinite(v) for h in res["history"] for v in h.values())


def test_fsdp2_asynchronous_rollouts_sample_with_the_gathered_weights(runs):
    # batch 2 is sampled with the weights of the start of step 1, which the FSDP2 run gathers from its
    # shards: wrong or misordered gathered weights would sample other completions than the DDP run
    # (whose weights are whole) and the runs would part; equal up to the two strategies' rounding
    ddp, fsdp2 = runs.get("train_ddp_async"), runs.get("train_fsdp2_async")
    assert not ddp["info"]["dtensor_params"] and fsdp2["info"]["dtensor_params"]
    for k in ddp["start"]:
        assert torch.equal(ddp["start"][k], fsdp2["start"][k]), k
    assert [h["reward/mean"] for h in fsdp2["history"]] == [h["reward/mean"] for h in ddp["history"]]
    rel = _rel(_update(fsdp2), _update(ddp))
    print(f"fsdp2 vs ddp async: relative difference of the 3 steps' update {rel:.2e}")
    assert rel < 1e-4, rel


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_export_is_a_consolidated_policy(runs, trainer):
    from transformers import AutoModelForCausalLM

    res = runs.get(f"train_{trainer}_grpo")
    path = res["summary"]["export_dir"]
    assert os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(path)
    state = model.state_dict()
    for k, v in res["end"].items():  # the gathered full weights at the end of training
        assert torch.equal(state[k].float(), v), k


# --- exactness: 2 ranks == 1 process on the same batch --------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The single-process runs (trainer=cpu) with the whole batch: 4 prompts x 4 samples."""
    out = tmp_path_factory.mktemp("reference")
    return {name: fit_fixed(compose(out, f"ref_{name}", exact_overrides("cpu", 4, name))) for name in EXACT}


@pytest.mark.parametrize("name", list(EXACT))
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_two_ranks_update_like_one_process(runs, reference, trainer, name):
    res, ref = runs.get(f"exact_{trainer}_{name}"), reference[name]
    assert res["info"]["world_size"] == 2 and ref["info"]["world_size"] == 1
    for k in ref["start"]:
        assert torch.equal(res["start"][k], ref["start"][k]), f"different initial weights: {k}"
    rel = _rel(_update(res), _update(ref))
    print(f"{trainer} {name}: relative difference of the update {rel:.2e}")
    assert _changed(ref) and rel < REL_TOL, rel
    probe = {"masked": "mask/high_entropy_frac", "m2po": "mask/m2po_frac", "corrected": "correction/token_frac_high"}
    if name in probe:  # the mask / correction really acts on this batch: some tokens in, some out
        assert 0.0 < ref["history"][-1][probe[name]] < 1.0, ref["history"][-1][probe[name]]
    # every logged scalar (over the whole batch of all ranks) agrees too, timings aside
    got, want = res["history"][-1], ref["history"][-1]
    keys = {k for k in want if not k.startswith("perf/")}
    assert keys == {k for k in got if not k.startswith("perf/")}
    # the masks' fractions and the correction's ratios of sums (effective sample size, per-sequence
    # fractions) are computed on each rank's rows and combined as token-weighted means: approximations
    # across ranks (metrics.rollout_scalars); the update itself, checked above, is exact
    keys -= {k for k in keys if k.startswith(("correction/ess", "correction/seq_", "mask/"))}
    bad = {k: (got[k], want[k]) for k in keys if abs(got[k] - want[k]) > REL_TOL * max(1.0, abs(want[k]))}
    assert not bad, bad


def test_fsdp2_resume_continues_with_the_saved_weights(runs):
    res = runs.get("resume_fsdp2")
    resumed, straight = res["resumed"], res["straight"]
    assert res["saved_step"] == 2 and res["final_ckpt_step"] == 3
    assert resumed["start_step"] == 2 and resumed["end_step"] == 3
    assert resumed["info"]["strategy"] == "FSDP2Strategy" and resumed["info"]["checkpoint_io"] == "AtomicCheckpointIO"
    # a single consolidated file, written atomically (no temporary file left behind)
    folder = Path(res["ckpt"]).parent
    assert Path(res["ckpt"]).is_file() and not [p for p in folder.iterdir() if ".tmp-" in p.name]
    for k, v in res["saved_policy"].items():
        assert torch.equal(resumed["start"][k], v), k
    assert _changed(resumed)
    # the resumed run ends where 3 uninterrupted steps end (optimizer state, data order and sampling restored)
    assert _rel(resumed["end"], straight["end"]) < 1e-6
    assert len(resumed["history"]) == 3  # the history travels in the checkpoint


def test_fsdp2_asynchronous_rollouts_resume_where_the_run_would_be(runs):
    resumed, straight = runs.get("resume_fsdp2_async"), runs.get("train_fsdp2_async")
    assert resumed["start_step"] == 2 and resumed["end_step"] == 3 and _changed(resumed)
    # the 3rd batch is sampled again with the saved weights of step 1 and trained on as before
    assert resumed["history"][-1]["reward/mean"] == straight["history"][-1]["reward/mean"]
    assert _rel(resumed["end"], straight["end"]) < 1e-6


# --- sharded generation ------------------------------------------------------------------------------

def test_fsdp2_generation_with_different_lengths_per_rank(runs):
    res = runs.get("generate_fsdp2")
    assert res["sharded"] and res["synced"]
    lengths = res["lengths"]  # completion lengths per rank
    assert max(lengths[0]) < min(lengths[1]), lengths  # rank 0 stops early, rank 1 runs on
    assert res["same_as_unsharded"]


# --- the real launcher ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_rlopt_train_cli_with_lightnings_launcher(tmp_path, trainer):
    """``python -m rlopt.train trainer=...``: Lightning launches the second process itself."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlopt.train", "debug=default", f"trainer={trainer}", "logger=none",
           "callbacks=default", "task.train.size=64", "task.val.size=4", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[rlopt] 2 steps" in proc.stdout
    assert (tmp_path / "policy" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
