"""Scenarios for tests/test_distributed.py, run inside one 2-process gloo group on the CPU:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed_worker OUT NAME...

One launch runs every scenario (process start-up and imports dominate on a small machine). Each rank
writes ``OUT/results-<rank>.pt`` after every scenario: ``{name: result}``, a result being a dict or
``{"error": traceback}``. The process group gets a short timeout, so a rank left waiting in a
collective fails that scenario instead of hanging the test session.

The helpers (fixed rollouts, the full-state probe, the exactness configs) are imported by the test
module too: it runs the single-process reference runs in-process with the same code.
"""

from __future__ import annotations

import os
import sys
import traceback
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from rlopt import distributed as rdist
from rlopt.rollout import Completions

HASH_REWARD = "+task.rewards.hash={_target_:tests.conftest.reward_hash,_partial_:true}"
SMALL_TASK = ("task.train.size=64", "task.val.size=4")
PROBE = "+callbacks.probe={_target_:tests.distributed_worker.FullStateProbe}"
T_MAX = 6  # completion length budget of the fixed rollouts (= rollout.max_new_tokens)
GROUP = 4

# exactness scenarios: overrides on top of the common ones (exact_overrides)
EXACT = {
    "token_mean": ["aggregation=token_mean", "num_minibatches=2", "micro_batch_size=3", "advantage=batch_std"],
    "seq_mean_token_mean": ["aggregation=seq_mean_token_mean", "num_minibatches=2", "micro_batch_size=3",
                            "advantage=batch_std"],
    "seq_mean_token_sum": ["aggregation=seq_mean_token_sum", "num_minibatches=2", "micro_batch_size=3",
                           "advantage=batch_std", "ppo_epochs=2"],
    "seq_mean_token_sum_norm": ["aggregation=seq_mean_token_sum_norm", "num_minibatches=2", "micro_batch_size=3",
                                "advantage=batch_std"],
    "on_policy": ["num_minibatches=1"],  # grpo as configured: group std, whole-batch update
    # token masks: the entropy quantile over both ranks' tokens, truncated completions out of the normaliser
    "masked": ["aggregation=token_mean", "num_minibatches=2", "micro_batch_size=3", "advantage=batch_std",
               "masks=[truncated,entropy_80_20]"],
    # a behaviour correction on the fixed completions' sampler log-probs (TIS, capped at 1.5)
    "corrected": ["aggregation=seq_mean_token_mean", "num_minibatches=2", "micro_batch_size=3",
                  "advantage=batch_std", "correction=tis", "correction.cap=1.5"],
    # M2PO: the second-moment threshold over both ranks' tokens, with its decoupled weight
    "m2po": ["algorithm=m2po", "masks.m2po.tau=0.5", "num_minibatches=2", "advantage=batch_std", "kl=none"],
}


def exact_overrides(trainer: str, batch_size: int, name: str) -> list[str]:
    """One rollout step on a fixed batch with plain SGD (Adam's first step, ~lr*sign(g), would hide
    a wrong gradient scale) and no clipping (a clipped update only keeps the direction)."""
    return [f"trainer={trainer}", "steps=1", f"group_size={GROUP}", f"data.batch_size={batch_size}",
            f"rollout.max_new_tokens={T_MAX}", "trainer.limit_val_batches=0", *SMALL_TASK, HASH_REWARD,
            "optimizer._target_=torch.optim.SGD", "optimizer.lr=0.1", "~optimizer.betas", "max_grad_norm=null",
            *EXACT[name]]


# ---------------------------------------------------------------------------------------- helpers
def fixed_make_completions(module: Any, batch: dict[str, list[Any]]) -> tuple[Completions, list[str]]:
    """``make_completions`` replacement: completions that are a function of (prompt, sample index) only,
    of varying lengths (some end with EOS, some not), so that any world size trains on the same batch.
    Each rank pads to its own widths, as real rollouts do."""
    prompts, g = batch["prompt"], module.group_size
    ids, mask = module.encode_prompts(prompts)
    tok = module.tokenizer
    rows, ended, mus = [], [], []
    for p in prompts:
        for s in range(g):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{p}|{s}".encode()))
            n = int(torch.randint(1, T_MAX + 1, (1,), generator=gen))
            toks = torch.randint(4, len(tok), (n,), generator=gen)
            end = bool(torch.rand((), generator=gen) < 0.6)
            if end:
                toks[-1] = tok.eos_token_id
            rows.append(toks)
            ended.append(end)
            # a sampler's log-probs for the behaviour corrections: also a function of (prompt, sample) only
            mus.append(-2.0 - 3.5 * torch.rand(n, generator=torch.Generator().manual_seed(zlib.crc32(f"{p}|{s}|mu".encode()))))
    width = max(len(r) for r in rows)
    comp = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros((len(rows), width), dtype=torch.long)
    mu = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        comp[i, :len(r)] = r
        cmask[i, :len(r)] = 1
        mu[i, :len(r)] = mus[i]
    dev = module.device
    ro = Completions(ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), comp.to(dev), cmask.to(dev),
                     torch.tensor([not e for e in ended], device=dev), mu.to(dev))
    return ro, module.decode(ro)


def full_policy_state(module: Any) -> dict[str, torch.Tensor]:
    """The policy's full weights on CPU (collective under FSDP: every rank calls it; rank 0 gets them)."""
    sd = rdist.full_state_dict(module.policy)
    if sd is None:
        sd = module.policy.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


class FullStateProbe(L.Callback):
    """Start/end step, full policy weights, history and strategy facts (``FullStateProbe.last``)."""

    last: "FullStateProbe | None" = None

    def __init__(self) -> None:
        FullStateProbe.last = self
        self.start_step = self.end_step = None
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start_step = trainer.global_step
        self.start = full_policy_state(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.end_step = trainer.global_step
        self.end = full_policy_state(pl_module)
        self.history = list(pl_module.history)
        params = list(pl_module.policy.parameters())
        self.info = {
            "strategy": type(trainer.strategy).__name__,
            "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__,
            "world_size": trainer.world_size,
            "dtensor_params": all(type(p).__name__ == "DTensor" for p in params),
            "ref_dtensor_params": pl_module.ref_policy is not None and all(
                type(p).__name__ == "DTensor" for p in pl_module.ref_policy.parameters()),
            "synced_generation": rdist.synced_generation(pl_module.policy),
        }

    def result(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "end_step": self.end_step, "start": self.start, "end": self.end,
                "history": self.history, "info": self.info}


def compose(out: Path, name: str, overrides: list[str]):
    """The scenario's config. ``scheduler=none``: these short runs compare and resume updates, and
    the default cosine schedule over ``steps`` would reach lr 0 on the last step (a resumed 3rd step
    of a 2-step run would not move the weights)."""
    from tests.conftest import compose_train

    return compose_train(out / name, ["scheduler=none", *overrides])


def fit_fixed(cfg) -> dict[str, Any]:
    """``build`` + one fit on the fixed rollout batch; the probe's result (full weights on rank 0)."""
    from rlopt.train import build

    module, dm, trainer = build(cfg)
    module.make_completions = fixed_make_completions.__get__(module)
    probe = FullStateProbe()
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=dm)
    return probe.result()


# ---------------------------------------------------------------------------------------- scenarios
def train(out: Path, trainer: str, algorithm: str, extra: list[str] = (), name: str | None = None) -> dict[str, Any]:
    """``rlopt.train.run`` of a composed config (what ``rlopt-train trainer=... algorithm=...`` does)."""
    from rlopt.train import run

    name = name or f"train_{trainer}_{algorithm}"
    cfg = compose(out, name, [f"trainer={trainer}", f"algorithm={algorithm}", HASH_REWARD, *SMALL_TASK,
                              "callbacks=default", PROBE, *extra])
    summary = run(cfg)
    res = FullStateProbe.last.result()
    res["summary"] = {k: v for k, v in summary.items() if k != "val"} | {"val": summary.get("val", {})}
    res["output_dir"] = str(cfg.output_dir)
    return res


def resume(out: Path) -> dict[str, Any]:
    """FSDP2: continue ``train_fsdp2_grpo`` (2 steps, checkpoints every step) for a 3rd step, and run
    the same 3 steps without interruption for comparison."""
    from rlopt.train import run

    ckpt = out / "train_fsdp2_grpo" / "checkpoints" / "last.ckpt"
    common = ["trainer=fsdp2", "algorithm=grpo", HASH_REWARD, *SMALL_TASK, "callbacks=default", PROBE,
              "checkpoint_every=1", "steps=3", "export_dir=null"]
    run(compose(out, "resume_fsdp2", [*common, f"ckpt_path={ckpt}"]))
    resumed = FullStateProbe.last.result()
    run(compose(out, "straight_fsdp2", common))
    straight = FullStateProbe.last.result()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True) if rdist.is_global_zero() else {}
    return {"resumed": resumed, "straight": straight, "ckpt": str(ckpt),
            "saved_policy": {k[len("policy."):]: v.float() for k, v in saved.get("state_dict", {}).items()
                             if k.startswith("policy.")},
            "saved_step": saved.get("global_step"),
            "final_ckpt_step": (torch.load(out / "resume_fsdp2" / "checkpoints" / "last.ckpt", map_location="cpu",
                                           weights_only=True)["global_step"] if rdist.is_global_zero() else None)}


def resume_async(out: Path) -> dict[str, Any]:
    """FSDP2 + async rollouts (deterministic, max_lag=1): 2 steps with a checkpoint, then resumed
    for a 3rd; ``train_fsdp2_async`` is the same 3 steps without interruption. The checkpoint holds
    the weights the batch in flight was to be sampled with (gathered from the shards)."""
    from rlopt.train import run

    common = ["trainer=fsdp2", "algorithm=grpo", HASH_REWARD, *SMALL_TASK, "callbacks=default", PROBE,
              "export_dir=null", "offpolicy.async=true"]
    run(compose(out, "first_fsdp2_async", [*common, "steps=2", "checkpoint_every=1"]))
    ckpt = out / "first_fsdp2_async" / "checkpoints" / "last.ckpt"
    run(compose(out, "resumed_fsdp2_async", [*common, "steps=3", f"ckpt_path={ckpt}"]))
    return FullStateProbe.last.result()


def exact(out: Path, trainer: str, name: str) -> dict[str, Any]:
    cfg = compose(out, f"exact_{trainer}_{name}", exact_overrides(trainer, 2, name))
    return fit_fixed(cfg)


def generate(out: Path) -> dict[str, Any]:
    """FSDP2-sharded generation where the ranks' prompts stop after different numbers of tokens:
    rank 0 ends at its first token (its EOS is the token it greedily produces first), rank 1 runs
    on. ``module.sample`` must pass ``synced_gpus`` (or rank 1 would wait forever in an all-gather)
    and produce what the unsharded model produces."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlopt.algorithms import build_preset
    from rlopt.module import PolicyOptModule
    from rlopt.rewards import RewardSet
    from rlopt.rollout import HFGenerate
    from rlopt.tiny import build_tiny

    rank = dist.get_rank()
    path = build_tiny(str(out / "gen_tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = ["abc>", "dcbe>"] if rank == 0 else ["fedcbaab>", "ee>"]
    engine = HFGenerate(max_new_tokens=8)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    free = engine.generate(ref_model, enc["input_ids"], enc["attention_mask"], 1, 10**6, tok.pad_token_id,
                           greedy=True).completion_ids  # [2, 8] greedy tokens with no EOS at all
    if rank == 0:  # EOS = the first token: stops after one step
        eos = int(free[0, 0])
    else:  # EOS = a token it never produces: runs the whole budget
        eos = next(i for i in range(4, len(tok)) if i not in set(free.flatten().tolist()))
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    expected = engine.generate(ref_model, enc["input_ids"], enc["attention_mask"], 1, tok.eos_token_id,
                               tok.pad_token_id, greedy=True)

    model = AutoModelForCausalLM.from_pretrained(path)
    rdist.shard_fsdp2(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    advantage, objective = build_preset("gspo")  # no reference model
    module = PolicyOptModule(model, tok, advantage, objective, RewardSet({"x": lambda p, c, **k: [0.0] * len(c)}),
                             rollout=engine, group_size=2)
    got = module.sample(prompts, 1, greedy=True)
    lens = got.completion_mask.sum(-1)
    exp_lens = expected.completion_mask.sum(-1)
    same = bool(torch.equal(lens, exp_lens)) and all(
        torch.equal(got.completion_ids[i, :n], expected.completion_ids[i, :n]) for i, n in enumerate(exp_lens.tolist()))
    all_lens = [None] * dist.get_world_size()
    dist.all_gather_object(all_lens, lens.tolist())
    return {"synced": rdist.synced_generation(model), "same_as_unsharded": same, "lengths": all_lens,
            "sharded": rdist.is_sharded(model)}


SCENARIOS = {
    "train_ddp_grpo": lambda out: train(out, "ddp", "grpo", [f"export_dir={out / 'train_ddp_grpo' / 'policy'}"]),
    "train_ddp_gspo": lambda out: train(out, "ddp", "gspo", ["export_dir=null"]),
    "train_fsdp2_grpo": lambda out: train(out, "fsdp2", "grpo", ["checkpoint_every=1",
                                                                  f"export_dir={out / 'train_fsdp2_grpo' / 'policy'}"]),
    "train_fsdp2_gspo": lambda out: train(out, "fsdp2", "gspo", ["export_dir=null"]),
    # offpolicy.async: one rollout worker per rank, each sampling its rank's prompts one step ahead;
    # under FSDP2 with whole weights gathered from the shards every step
    **{f"train_{t}_async": (lambda out, t=t: train(out, t, "grpo", ["export_dir=null", "offpolicy.async=true", "steps=3"],
                                                   name=f"train_{t}_async")) for t in ("ddp", "fsdp2")},
    "resume_fsdp2": resume,
    "resume_fsdp2_async": resume_async,  # after train_fsdp2_async (the uninterrupted run)
    "generate_fsdp2": generate,
    **{f"exact_{t}_{n}": (lambda out, t=t, n=n: exact(out, t, n)) for t in ("ddp", "fsdp2") for n in EXACT},
}


def main(argv: list[str]) -> None:
    out, names = Path(argv[0]), argv[1:] or list(SCENARIOS)
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("RLOPT_TEST_PG_TIMEOUT", "120"))))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name](out)
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"error": traceback.format_exc()}
            print(f"[rank {rank}] scenario {name} failed:\n{results[name]['error']}", file=sys.stderr, flush=True)
        torch.save(results, out / f"results-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    # run the importable module's copy: configs refer to tests.distributed_worker.FullStateProbe
    from tests import distributed_worker

    distributed_worker.main(sys.argv[1:])
