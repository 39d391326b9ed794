"""The work trl_compare.py gives both frameworks: model sizes, algorithms, the task and the
warmed-up model both load (built once per size and seed, cached in benchmarks/.cache).

    from trl_work import SIZES, prepare_model
    path = prepare_model("small", seed=0)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

# the prepared models (RLOPT_BENCH_CACHE moves it: the smoke tests use a temporary folder)
CACHE = os.environ.get("RLOPT_BENCH_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")

SIZES = {
    # the embedded default: rlopt.tiny's model and the reverse task of configs/task/reverse.yaml
    "tiny": dict(model=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_positions=128),
                 task=dict(alphabet="abcdef", min_len=3, max_len=5), max_new_tokens=8, batch=16, group=8,
                 steps=30, lr=3e-3, warmup_steps=30, micro=None),
    # ~11M parameters, long completions: reverse 20-60 characters within a 64-token budget
    "small": dict(model=dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, max_positions=256),
                  task=dict(alphabet="abcdefghij", min_len=20, max_len=60), max_new_tokens=64, batch=8, group=8,
                  steps=6, lr=3e-4, warmup_steps=20, micro=16),
}
ALGOS = {
    "grpo": dict(ratio="token", eps_low=0.2, eps_high=0.2),
    "gspo": dict(ratio="sequence", eps_low=3e-4, eps_high=4e-4),
}



def _task(size: str):
    from rlopt.tasks import ReverseTask

    return ReverseTask(**SIZES[size]["task"])


def param_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prepare_model(size: str, seed: int) -> str:
    """Build (or reuse) the warmed-up model folder for ``size``; returns its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlopt.tiny import build_tokenizer
    from rlopt.warmup import supervised_warmup

    spec = SIZES[size]
    key = json.dumps([spec["model"], spec["task"], spec["warmup_steps"], seed], sort_keys=True)
    path = os.path.join(CACHE, f"{size}-" + hashlib.sha1(key.encode()).hexdigest()[:10])
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = build_tokenizer()
    m = spec["model"]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                      num_key_value_heads=m["num_heads"], max_position_embeddings=m["max_positions"],
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    rows = _task(size).rows("train", 2000, seed=seed)
    t0 = time.perf_counter()
    losses = supervised_warmup(model, tok, rows, spec["warmup_steps"], lr=3e-3 if size == "tiny" else 1e-3,
                               batch_size=32, seed=seed)
    print(f"[prepare] {size}: {param_count(model) / 1e6:.2f}M params, warm-up {spec['warmup_steps']} steps "
          f"(loss {losses[0]:.2f} -> {losses[-1]:.2f}) in {time.perf_counter() - t0:.0f}s", flush=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- workers
