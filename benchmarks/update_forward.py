"""The update's forward + backward four ways, side by side: plain, shared KV cache, packed (two attentions).

    python benchmarks/update_forward.py                   # tiny and small (trl_compare's models), 1 thread
    python benchmarks/update_forward.py --sizes small --threads 2 --repeats 5
    python benchmarks/update_forward.py --sizes small --long    # long completions: packed rows of ~470 tokens

One rollout batch per size (trl_compare.py's warmed-up model, prompts and sampler: B prompts x
G = 8 completions), then the update's passes over it as PolicyOptModule runs them (micro-batches
of whole groups ordered by length, ``trim_padding``, log-probs and entropy, ``backward``), timed
for each forward of rlopt/logprobs: ``plain`` (``share_prompt: false``), ``kv_cache``
(``pack: false``: the prompt's KV cache shared by its completions) and ``packed`` (the default:
one row per prompt, its completions behind it, no padding), its attention ``dense`` (SDPA over
the row under the tree mask) or ``segments`` (each completion against its prompt and its own
prefix; ``pack_attention: auto`` picks it for long groups). The four are interleaved, repeated,
and reported as medians with the tokens each computes; their log-probs agree (max abs
difference printed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import trl_work as tc  # benchmarks/ is this script's folder: trl_compare.py's model and task setup


def bench_size(size: str, a: argparse.Namespace) -> None:
    """One table row: the three forwards on one rollout batch of ``size``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlopt.logprobs import CompletionLogProbs, by_length, pack_layout, prompt_plan
    from rlopt.logprobs.completion import trim_padding
    from rlopt.rollout.lean import KVCacheSampler

    spec = tc.SIZES[size]
    path = tc.prepare_model(size, a.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    rows = tc._task(size).rows("train", spec["batch"], seed=a.seed)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    torch.manual_seed(a.seed)
    t_max = spec["max_new_tokens"]
    ro = KVCacheSampler(temperature=1.0, max_new_tokens=t_max).generate(
        model, enc["input_ids"], enc["attention_mask"], spec["group"], None if a.long else tok.eos_token_id,
        tok.pad_token_id)
    n, g = ro.completion_ids.shape[0], spec["group"]
    if a.long:  # no EOS sampled: cut each completion at a length drawn from [2/3, 1] of the budget
        lengths = torch.randint(2 * t_max // 3, t_max + 1, (n,), generator=torch.Generator().manual_seed(a.seed))
        ro.completion_mask = (torch.arange(ro.completion_ids.shape[1])[None] < lengths[:, None]).long()
    micro = spec["micro"] or n
    chunks = by_length(torch.arange(n), ro, micro, g).split(micro)
    kinds = {"plain": CompletionLogProbs(share_prompt=False), "kv_cache": CompletionLogProbs(pack=False),
             "dense": CompletionLogProbs(pack_attention="dense"), "segments": CompletionLogProbs(pack_attention="segments")}

    def tokens(kind: str) -> int:
        total = 0
        for idx in chunks:
            r = trim_padding(ro.select(idx))
            p_len, c_len = r.prompt_mask.sum(-1), r.completion_mask.sum(-1)
            if kind == "plain":
                total += r.input_ids.numel()
            elif kind == "kv_cache":
                total += len(set((idx // g).tolist())) * r.prompt_ids.shape[1] + r.completion_ids.numel()
            else:  # prompts once + the completion tokens fed (the last predicts nothing), unpadded
                total += int(p_len[::g].sum()) + int((c_len - 1).clamp(min=0).sum())
        return total

    def update(kind: str) -> torch.Tensor:
        out = []
        for idx in chunks:
            logp, _ent = kinds[kind](model, ro.select(idx), with_entropy=True)
            logp.sum().backward()
            out.append(logp.detach() * ro.completion_mask[idx])
        model.zero_grad(set_to_none=True)
        return torch.cat(out)

    ref = {k: update(k) for k in kinds}  # warm-up, and the values compared
    diff = max(float((ref[k] - ref["plain"]).abs().max()) for k in kinds)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.repeats or (15 if size == "tiny" else 3)):
        for k in kinds:  # interleaved
            t0 = time.perf_counter()
            update(k)
            times[k].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    first = trim_padding(ro.select(chunks[0]))  # what pack_attention=auto picks (for the first micro-batch)
    lay = pack_layout(first, prompt_plan(first.prompt_ids, first.prompt_mask))
    auto = "segments" if lay is not None and lay.segments is not None else "dense"
    print(f"| {size} | {n} x {ro.completion_ids.shape[1]} | {tokens('plain')} / {tokens('kv_cache')} / "
          f"{tokens('packed')} | {ms['plain']:.1f} | {ms['kv_cache']:.1f} | {ms['dense']:.1f} | {ms['segments']:.1f} | "
          f"{auto} |  (max abs log-prob difference {diff:.1e})", flush=True)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=0, help="timed passes per forward (0: 15 tiny, 3 small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long", action="store_true", help="long completions (2/3 to all of the budget, no EOS)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, {a.threads} thread(s)")
    print("| size | rows x max len | tokens: plain / kv_cache / packed | plain ms | kv_cache ms | packed, dense ms | "
          "packed, segments ms | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for size in a.sizes.split(","):
        bench_size(size, a)

if __name__ == "__main__":
    main()
