"""The two workers of trl_compare.py, each run in a fresh process (``trl_compare.py --worker``):
rlopt (``rlopt``, ``rlopt_async``) and TRL's GRPOTrainer (``trl``, in its own virtual
environment), on the work of trl_work.py. Each returns its step end times, per-step rewards,
token counts and prompt fingerprints (the Recorder wraps the shared reward function), and RSS.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import sys
import tempfile
import time

from trl_work import ALGOS, SIZES, _task, param_count


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_rss_of(pid: int) -> float:
    """Peak RSS (VmHWM) of another live process, e.g. rlopt_async's rollout worker."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024  # kB


class Recorder:
    """Wraps the reward function: per call (= per rollout step) the mean reward and token count."""

    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.tokens: list[int] = []
        self.prompt_tokens: list[int] = []
        self.prompts: list[str] = []  # a fingerprint of each step's distinct prompts
        self.__name__ = "partial_match"

    def record(self, scores, n_tokens: int, n_prompt_tokens: int, prompts) -> None:
        self.prompts.append(hashlib.sha1("\n".join(sorted(set(prompts))).encode()).hexdigest()[:12])
        self.rewards.append(sum(scores) / max(len(scores), 1))
        self.tokens.append(int(n_tokens))
        self.prompt_tokens.append(int(n_prompt_tokens))


def _token_counter(tok):
    """Prompt length in tokens, memoised (the same cost in both workers' reward wrapper)."""
    cache: dict[str, int] = {}

    def count(p: str) -> int:
        if p not in cache:
            cache[p] = len(tok(p)["input_ids"])
        return cache[p]

    return count


def worker_rlopt(a) -> dict:
    import lightning as L
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlopt.algorithms import GroupBaseline, PolicyObjective, PPOClip, SeqMeanTokenMean, SequenceRatio, TokenRatio
    from rlopt.data import PromptDataModule, TaskSource
    from rlopt.module import PolicyOptModule
    from rlopt.rewards import RewardSet, partial_match
    from rlopt.rollout import HFGenerate
    from rlopt.rollout.lean import KVCacheSampler

    spec, algo = SIZES[a.size], ALGOS[a.algo]
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype))
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rss_loaded = _rss_mb()
    rec = Recorder()
    n_tokens = _token_counter(tok)

    def reward(prompts, completions, answer, completion_lengths, **kw):
        out = partial_match(prompts, completions, answer)
        rec.record(out, sum(completion_lengths), sum(n_tokens(p) for p in prompts), prompts)
        return out

    pipeline = None
    if a.worker == "rlopt_async":  # generation in a worker process with its own threads, one batch ahead
        from rlopt.rollout.pipeline import AsyncRollouts

        pipeline = AsyncRollouts(max_lag=1, worker_threads=a.worker_threads, borrow_threads=a.borrow_threads)
    engine_cls = KVCacheSampler if a.rlopt_rollout == "lean" else HFGenerate
    engine = engine_cls(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=spec["max_new_tokens"],
                        min_new_tokens=spec["max_new_tokens"] if a.fixed_length else 0)
    ratio = TokenRatio() if algo["ratio"] == "token" else SequenceRatio()
    objective = PolicyObjective(ratio, PPOClip(algo["eps_low"], algo["eps_high"]), SeqMeanTokenMean(),
                                correction=a.rlopt_correction if a.worker != "trl" else None)
    lr = spec["lr"]
    module = PolicyOptModule(model, tok, GroupBaseline(scale="group", std="unbiased", eps=1e-4), objective,
                             RewardSet({"match": reward}),
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=True,
                                                                    weight_decay=0.0),
                             rollout=engine, group_size=spec["group"], max_grad_norm=1.0, log_samples_every=0,
                             micro_batch_size=spec["micro"], seed=a.seed, async_rollouts=pipeline,
                             staleness=a.rlopt_staleness if a.worker == "rlopt" else 0)
    dm = PromptDataModule(TaskSource(_task(a.size), size=4000, seed=a.seed), batch_size=spec["batch"], seed=a.seed,
                          shuffle=False)  # the rows in order, as TRL takes them (shuffle_dataset=False)
    times: list[float] = []

    worker_rss: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, *args, **kw):
            times.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):  # before the rollout worker is stopped
            if pipeline is not None and pipeline.process is not None:
                worker_rss.append(_peak_rss_of(pipeline.process.pid))

    trainer = L.Trainer(max_steps=a.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[Timer()],
                        limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    if a.profile:
        with torch.profiler.profile() as prof:
            trainer.fit(module, datamodule=dm)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    else:
        trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    hist = module.history
    return dict(times=times, wall=wall, rss_loaded=rss_loaded, rewards=rec.rewards, tokens=rec.tokens,
                prompt_tokens=rec.prompt_tokens, prompts=rec.prompts, params=param_count(model), worker_peak_rss=sum(worker_rss),
                dtype=str(next(model.parameters()).dtype),
                rollout_s=[h.get("perf/rollout_s", float("nan")) for h in hist],
                update_s=[h.get("perf/update_s", float("nan")) for h in hist])


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlopt.rewards import partial_match

    spec, algo = SIZES[a.size], ALGOS[a.algo]
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype))
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    tok.padding_side = "left"
    rss_loaded = _rss_mb()
    rec = Recorder()
    n_tokens = _token_counter(tok)

    def reward(prompts, completions, completion_ids, answer, **kw):
        out = partial_match(prompts, completions, answer)
        rec.record(out, sum(len(c) for c in completion_ids), sum(n_tokens(p) for p in prompts), prompts)
        return out

    reward.__name__ = "partial_match"
    rows = _task(a.size).rows("train", 4000, seed=a.seed)
    ds = Dataset.from_list(rows)
    n = spec["batch"] * spec["group"]  # completions per optimizer step (one generation batch)
    micro = spec["micro"] or n
    accum = n // micro  # steps_per_generation defaults to it: one generation per optimizer step
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        num_generations=spec["group"], max_completion_length=spec["max_new_tokens"], learning_rate=spec["lr"],
        max_steps=a.steps, beta=0.0, loss_type="grpo", importance_sampling_level=algo["ratio"],
        epsilon=algo["eps_low"], epsilon_high=algo["eps_high"], scale_rewards="group", num_iterations=1,
        temperature=1.0, top_p=1.0, top_k=0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0, seed=a.seed,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, log_completions=False, shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": spec["max_new_tokens"]} if a.fixed_length else None,
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    t0 = time.perf_counter()
    if a.profile:
        with torch.profiler.profile() as prof:
            trainer.train()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    else:
        trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    return dict(times=times, wall=wall, rss_loaded=rss_loaded, rewards=rec.rewards, tokens=rec.tokens,
                prompt_tokens=rec.prompt_tokens, prompts=rec.prompts, params=param_count(model),
                dtype=str(next(model.parameters()).dtype))
