"""Rollout engines side by side: transformers' generate vs rlopt's KVCacheSampler variants.

    python benchmarks/sampler_speed.py                    # the 'small' model of trl_compare.py
    python benchmarks/sampler_speed.py --size tiny --repeats 7
    python benchmarks/sampler_speed.py --no-eos           # every completion runs to the budget

Same model (trl_compare.py's prepared, warmed-up model of that size), the same prompts and
seed for every engine; each engine samples ``batch x group`` completions of up to the size's
completion budget, ``--repeats`` times in turn (engines interleaved, so a change of machine load
hits all alike); the median wall time is reported, with the tokens produced and the rows x
decode steps computed (pruning finished rows lowers it). Every engine draws the same tokens
(checked: the script fails otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-eos", action="store_true", help="no EOS: every completion runs to the budget")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlopt.rollout import HFGenerate
    from rlopt.rollout.lean import KVCacheSampler
    from trl_work import SIZES, _task, prepare_model  # benchmarks/ is this script's folder

    torch.set_num_threads(a.threads)
    spec = SIZES[a.size]
    path = prepare_model(a.size, 0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    rows = _task(a.size).rows("train", spec["batch"], seed=1)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    t = spec["max_new_tokens"]
    engines = {
        "HFGenerate (model.generate)": HFGenerate(max_new_tokens=t),
        "KVCacheSampler cache=dynamic, no pruning": KVCacheSampler(max_new_tokens=t, cache="dynamic", prune_finished=False),
        "KVCacheSampler cache=static, no pruning": KVCacheSampler(max_new_tokens=t, cache="static", prune_finished=False),
        "KVCacheSampler cache=buffer, no pruning": KVCacheSampler(max_new_tokens=t, prune_finished=False,
                                                                  prefix_attention="repeated"),
        "KVCacheSampler cache=buffer + pruning, repeated prompt cache": KVCacheSampler(max_new_tokens=t,
                                                                                       prefix_attention="repeated"),
        "KVCacheSampler cache=buffer + pruning, shared prefix": KVCacheSampler(max_new_tokens=t, prefix_attention="shared"),
    }
    times = {k: [] for k in engines}
    outs, work = {}, {}
    for _ in range(a.repeats):
        for name, e in engines.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            ro = e.generate(model, enc["input_ids"], enc["attention_mask"], spec["group"],
                            eos_token_id=None if a.no_eos else tok.eos_token_id, pad_token_id=tok.pad_token_id)
            times[name].append(time.perf_counter() - t0)
            outs[name] = ro.completion_ids
            work[name] = getattr(e, "last_row_steps", None)
    ref = next(iter(outs.values()))
    same = all(torch.equal(o, ref) for o in outs.values())
    n, width = ref.shape
    toks = int((ref != tok.pad_token_id).sum())
    print(f"# {a.size}: {n} completions, budget {t}, {toks} tokens produced (width {width}), {a.threads} thread(s), "
          f"{a.repeats} interleaved repeats, {os.cpu_count()} CPU cores; 1-min load average "
          f"{os.getloadavg()[0]:.1f}; identical tokens across engines: {same}")
    print("\n| engine | median s | vs generate | tokens/s | rows x decode steps | runs (s) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(next(iter(times.values())))
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {base / m:.2f}x | {toks / m:.0f} | {work[name] if work[name] is not None else '-'} "
              f"| {', '.join(f'{x:.3f}' for x in ts)} |")
    if not same:
        raise SystemExit("engines drew different tokens")


if __name__ == "__main__":
    main()
