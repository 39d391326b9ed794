"""GPU check of the sharded strategies: FSDP (FSDPStrategy) and FSDP2 (FSDP2Strategy, a
ModelParallelStrategy), bf16, on one GPU, for the tiny model and a ~0.5B Qwen2-shaped model.

    python benchmarks/gpu_distributed_check.py                    # everything (~3-4 min on an H100)
    python benchmarks/gpu_distributed_check.py --models tiny      # only the tiny model
    python benchmarks/gpu_distributed_check.py --strategies fsdp2 --models qwen0.5b

Each (strategy, model) runs in its own subprocess (a CUDA or NCCL failure cannot poison the
next one; a hung one is killed after --timeout s) and trains --steps GRPO rollout steps (the
first is a warm-up; the numbers are those of the last) on a random-token prompt task: the
reward is the fraction of even token ids in a completion. Nothing is downloaded: the 0.5B model
is built from a Qwen2 config with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocabulary 151936) and random weights; the tokenizer is a word-level
one with a token ``t<id>`` per id.

Printed per run, as single lines:

    RESULT strategy=fsdp2 model=qwen0.5b params=494.0M tokens_per_s=... gen_tokens_per_s=... rollout_s=... update_s=... peak_mem_gib=... steps=2
    CHECK strategy=fsdp2 model=tiny export=ok resume=ok
    ERROR strategy=fsdp model=qwen0.5b: <exception>

``tokens_per_s``: completion tokens of the step / (rollout + update time); ``gen_tokens_per_s``:
completion tokens / rollout (generation) time; ``peak_mem_gib``: torch.cuda.max_memory_allocated
over the whole run (model, reference model, optimizer state, generation and update). For the tiny
model the run also exports a consolidated ``save_pretrained`` policy (all ranks gather, rank 0
writes) and saves a checkpoint and resumes from it for one more step (the FSDP1 paths that the
CPU tests cannot run: torch's FSDP1 needs an accelerator).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

STRATEGIES = ("fsdp", "fsdp2")
MODELS = {
    # name: (config kwargs, prompts per step, group size, prompt tokens, max new tokens)
    "tiny": (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512), 8, 4, 16, 16),
    "qwen0.5b": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936), 8, 4, 64, 64),
}


# ------------------------------------------------------------------------------------------ worker
def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


class _RandomPrompts:
    """A data source (``load()``): prompts of random token ids."""

    def __init__(self, vocab_size: int, n: int, length: int, seed: int = 0) -> None:
        self.vocab_size, self.n, self.length, self.seed = vocab_size, n, length, seed

    def load(self) -> list[dict]:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(4, self.vocab_size, (self.n, self.length), generator=g)
        return [{"prompt": " ".join(f"t{i}" for i in row.tolist())} for row in ids]


def even_fraction(prompts, completions, **kwargs) -> list[float]:
    out = []
    for c in completions:
        ids = [int(t[1:]) for t in c.split() if t.startswith("t") and t[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out


def _strategy(name: str):
    from lightning.pytorch.strategies import FSDPStrategy

    from rlopt.distributed import FSDP2Strategy, fsdp_mixed_precision
    from rlopt.models import decoder_layer_classes

    if name == "fsdp":  # as configs/trainer/fsdp.yaml
        return FSDPStrategy(auto_wrap_policy=decoder_layer_classes(), sharding_strategy="FULL_SHARD",
                            state_dict_type="full", mixed_precision=fsdp_mixed_precision("bfloat16", "float32")), "bf16-mixed"
    return FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32"), "32-true"  # as configs/trainer/fsdp2.yaml


_ACCELERATOR = "gpu"  # "cpu" only for a CPU dry run of the worker code (--cpu-dry-run, fsdp2 and tiny only)


def _trainer(strategy: str, max_steps: int, root: str):
    import lightning as L

    from rlopt.checkpointing import AtomicCheckpointIO

    strat, precision = _strategy(strategy)
    return L.Trainer(accelerator=_ACCELERATOR, devices=1, strategy=strat, precision=precision, max_steps=max_steps,
                     max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     use_distributed_sampler=False, default_root_dir=root, plugins=[AtomicCheckpointIO()])


def worker(strategy: str, model_name: str, steps: int, seed: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlopt.algorithms import build_preset
    from rlopt.data import PromptDataModule
    from rlopt.module import PolicyOptModule
    from rlopt.rewards import RewardSet
    from rlopt.rollout import HFGenerate

    cfg_kwargs, batch, group, prompt_len, new_tokens = MODELS[model_name]
    tok = _tokenizer(cfg_kwargs["vocab_size"])
    config = Qwen2Config(**cfg_kwargs, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)

    def make_module() -> PolicyOptModule:
        torch.manual_seed(seed)
        with torch.device("cuda" if _ACCELERATOR == "gpu" else "cpu"):  # GPU init: seconds, not a minute
            policy = Qwen2ForCausalLM(config)
        policy.generation_config.pad_token_id = tok.pad_token_id
        advantage, objective = build_preset("grpo")  # with the KL term: the reference model is sharded too
        return PolicyOptModule(policy, tok, advantage, objective, RewardSet({"even": even_fraction}),
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6), rollout=HFGenerate(max_new_tokens=new_tokens),
                               group_size=group, num_minibatches=2, micro_batch_size=group * batch // 4,
                               log_samples_every=0, seed=seed)

    def make_data() -> PromptDataModule:
        dm = PromptDataModule(_RandomPrompts(cfg_kwargs["vocab_size"], 64 * batch, prompt_len, seed), batch_size=batch,
                              seed=seed)
        dm.setup("fit")
        return dm

    root = tempfile.mkdtemp(prefix=f"rlopt_gpu_{strategy}_{model_name}_")
    module = make_module()
    n_params = sum(p.numel() for p in module.policy.parameters())
    gpu = _ACCELERATOR == "gpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = _trainer(strategy, steps, root)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=make_data())
    wall = time.perf_counter() - t0
    h = module.history[-1]
    tokens = h["completion/length_mean"] * batch * group
    print(f"RESULT strategy={strategy} model={model_name} params={n_params / 1e6:.1f}M "
          f"tokens_per_s={h['perf/tokens_per_s']:.1f} gen_tokens_per_s={tokens / max(h['perf/rollout_s'], 1e-9):.1f} "
          f"rollout_s={h['perf/rollout_s']:.2f} update_s={h['perf/update_s']:.2f} "
          f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30 if gpu else float('nan'):.2f} steps={trainer.global_step} "
          f"fit_wall_s={wall:.1f} loss={h['loss/total']:.4f} grad_norm={h['grad/norm']:.3f}", flush=True)

    if model_name != "tiny":
        return
    checks = {}
    try:  # export: every rank gathers, rank 0 writes; transformers reloads it
        from transformers import AutoModelForCausalLM

        path = module.export(os.path.join(root, "policy"))
        AutoModelForCausalLM.from_pretrained(path)
        checks["export"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["export"] = f"FAILED({type(e).__name__}: {e})"
    try:  # a checkpoint, then a fresh module resumed from it for one more step
        ckpt = os.path.join(root, "last.ckpt")
        trainer.save_checkpoint(ckpt)
        resumed = make_module()
        t2 = _trainer(strategy, steps + 1, root)
        t2.fit(resumed, datamodule=make_data(), ckpt_path=ckpt, weights_only=True)
        ok = t2.global_step == steps + 1 and len(resumed.history) == steps + 1
        checks["resume"] = "ok" if ok else f"FAILED(step {t2.global_step}, history {len(resumed.history)})"
    except Exception as e:  # noqa: BLE001
        checks["resume"] = f"FAILED({type(e).__name__}: {e})"
    print(f"CHECK strategy={strategy} model={model_name} " + " ".join(f"{k}={v}" for k, v in checks.items()), flush=True)


# ------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated: {', '.join(STRATEGIES)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=2, help="rollout steps per run; the last is reported (default 2)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run before it is killed (default 240)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", nargs=2, metavar=("STRATEGY", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # worker code on the CPU (fsdp2)
    args = ap.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    bad = [s for s in strategies if s not in STRATEGIES] + [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown strategy/model: {', '.join(bad)}")

    if args.worker:
        if args.cpu_dry_run:
            global _ACCELERATOR
            _ACCELERATOR = "cpu"
        try:
            worker(args.worker[0], args.worker[1], args.steps, args.seed)
        except Exception as e:  # noqa: BLE001 - one line for the driver, the traceback below it
            import traceback

            print(f"ERROR strategy={args.worker[0]} model={args.worker[1]}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            sys.exit(1)
        return

    import torch

    if not torch.cuda.is_available():
        print("ERROR: no CUDA device; this check needs one GPU")
        sys.exit(2)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    lines, start = [], time.perf_counter()
    for model in models:
        for strategy in strategies:
            t0 = time.perf_counter()
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", strategy, model, "--steps", str(args.steps),
                   "--seed", str(args.seed)]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                out = proc.stdout + proc.stderr
                mine = [ln for ln in proc.stdout.splitlines() if ln.startswith(("RESULT", "CHECK", "ERROR"))]
                if proc.returncode != 0 and not any(ln.startswith("ERROR") for ln in mine):
                    mine.append(f"ERROR strategy={strategy} model={model}: exit code {proc.returncode}")
                if proc.returncode != 0:
                    print(out[-4000:], flush=True)  # the traceback
            except subprocess.TimeoutExpired:
                mine = [f"ERROR strategy={strategy} model={model}: timed out after {args.timeout} s"]
            for ln in mine:
                print(ln, flush=True)
            print(f"# {strategy}/{model}: {time.perf_counter() - t0:.0f} s", flush=True)
            lines += mine
    print(f"\n==== summary ({time.perf_counter() - start:.0f} s) ====")
    for ln in lines:
        print(ln)


if __name__ == "__main__":
    main()
