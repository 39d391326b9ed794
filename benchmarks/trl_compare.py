"""rlopt vs TRL's GRPOTrainer on identical work, side by side, on this machine's CPU.

    python benchmarks/trl_compare.py                          # tiny + small, GRPO + GSPO (~6-10 min)
    python benchmarks/trl_compare.py --sizes tiny --algos grpo --steps-tiny 10
    python benchmarks/trl_compare.py --rlopt-rollout hf       # rlopt with transformers' generate

TRL is not a dependency of rlopt: the script installs it into its own virtual environment
(``benchmarks/.trl-venv``, git-ignored): ``python -m venv``, the same torch wheel as here
(``torch==<this torch>``, the CPU wheel), ``trl==TRL_VERSION`` (its dependencies resolve
around that torch, so no CUDA build is pulled), then ``pip install --no-deps -e <repo>`` so the
TRL worker can import the shared task and reward code (``rlopt.tasks``, ``rlopt.rewards``,
``rlopt.tiny``), nothing of rlopt's training code.

Identical work, per configuration:
* the model: a Llama config (char tokenizer of rlopt.tiny) built with a fixed seed, given the
  same short supervised warm-up (rlopt.warmup, so completions end with EOS at plausible
  lengths), saved once with ``save_pretrained`` and loaded by both workers (float32; ``--dtype
  bfloat16``: both load and train it in bf16, TRL with ``bf16=False`` so no autocast on top);
* the prompts: the procedural reverse task (rlopt.tasks.ReverseTask; its rows are random
  strings already), taken in order by both (TRL ``shuffle_dataset=False``, rlopt
  ``PromptDataModule(shuffle=False)``): the same 8 prompts at step k in both, checked (each step's
  prompts are fingerprinted in the reward wrapper; the run prints whether they matched);
* the reward: rlopt.rewards.partial_match (the same function object in both workers);
* the algorithm: group size G, B prompts per step (B*G completions, one rollout = one optimizer
  step, fully on-policy: TRL ``num_iterations=1``, ``steps_per_generation=1``; rlopt
  ``ppo_epochs=1``, ``num_minibatches=1``), the same completion budget, temperature 1, no top-k/p,
  AdamW (lr, betas (0.9, 0.99), eps 1e-8, no weight decay; torch's fused kernel in both: TRL's
  default ``optim="adamw_torch_fused"``, rlopt ``fused=True``), constant learning rate, grad-norm
  clip 1.0, no KL (TRL ``beta=0``; rlopt ``kl=none``). Advantage ``(r - mean_g) /
  (std_g + 1e-4)`` (TRL ``scale_rewards="group"``; rlopt GroupBaseline(eps=1e-4)).
  GRPO: token ratios, clip 0.2, loss averaged over each sequence's tokens then over sequences
  (TRL ``loss_type="grpo"`` == rlopt ``seq_mean_token_mean``). GSPO: sequence ratio
  ``exp(mean_t log r)``, clip (3e-4, 4e-4), same aggregation (TRL
  ``importance_sampling_level="sequence"``, ``loss_type="grpo"``; rlopt ``SequenceRatio``).
  TRL's CPU-hostile defaults are turned off (``gradient_checkpointing=False``, ``bf16=False``):
  both run float32 without recomputation. Both compute the per-token entropy (logged).
  ``small`` splits each optimizer step into 4 micro-batches of 16 completions in both (TRL
  ``per_device_train_batch_size=16``, ``gradient_accumulation_steps=4``, which makes its
  ``steps_per_generation`` 4: still one generation of 64 completions per optimizer step, no
  old-log-prob pass; rlopt ``micro_batch_size=16``).
* ``--fixed-length``: EOS cannot be drawn before the budget (TRL ``generation_kwargs=
  {"min_new_tokens": budget}``, rlopt ``rollout.min_new_tokens``), so every completion of every
  step has the budget's length in both: the same tokens per step by construction (completion
  lengths otherwise follow each run's own policy, and the work of a step with them).

What rlopt does differently (its own code paths, not settings): the lean KV-cache sampler
(rlopt/rollout/lean.py: preallocated cache, finished rows dropped from the batch, each prompt's cache
read once by its samples' decode steps), and in the update
it skips the columns that are padding in every row of a micro-batch, ordering whole groups by
length first so micro-batches hold similar lengths (rlopt/logprobs/completion.py ``trim_padding``), and
runs each prompt once per micro-batch with its KV cache shared by the group (rlopt/logprobs/shared_prompt.py).

Measured per worker (a fresh process each): wall time from the end of the first step to the
end of the second-to-last (the first step, with its one-off allocations, is excluded, and so is
the last: the asynchronous pipeline samples nothing during it, having sampled its batch during
the step before, so a window ending there would hold one sampling fewer than it does updates;
both frameworks' per-step overheads are included), samples/s = completions / that time, tokens/s = completion
tokens (up to and including EOS) / that time, peak RSS of the process (``ru_maxrss``) and
its RSS after loading the model, mean reward per step. FLOPs per step:
``2 * params * (prompt + completion tokens)`` for generation (prefill + decode) plus
``6 * params * (prompt + completion tokens)`` for the training forward + backward, counting
real (unpadded) tokens, tied embedding counted once, attention's own FLOPs ignored;
the ceiling is the measured float32 matmul rate (``torch.mm`` 2048^3 on the same thread count).
These are *nominal* FLOPs: every completion's prompt is counted, as a plain forward over
``[prompt + completion]`` rows computes it. rlopt runs each distinct prompt once per pass and
shares its KV cache with the G completions (``share_prompt``, ``share_prefill``), so it
executes fewer FLOPs than the nominal count, and its "fraction of the ceiling" can exceed 100%.
The speed verdict (``speed_ratios``) pairs each rlopt run with the TRL run beside it and reports
the geometric mean of the per-pair samples/s ratios with a bootstrap interval against ``--floor``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from trl_work import SIZES, prepare_model  # this folder: the work both frameworks do
from trl_workers import _peak_rss_mb, worker_rlopt, worker_trl  # ... and the two workers doing it

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRL_VERSION = "1.16.0"
DEFAULT_VENV = os.path.join(REPO, "benchmarks", ".trl-venv")


# ----------------------------------------------------------------------------- orchestration
def ensure_trl_venv(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    ok = os.path.exists(py) and subprocess.run(
        [py, "-c", f"import trl, rlopt; assert trl.__version__ == '{TRL_VERSION}'"], capture_output=True).returncode == 0
    if ok:
        return py
    import torch

    torch_version = torch.__version__.split("+")[0]
    print(f"[setup] installing TRL {TRL_VERSION} into {venv} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch_version}"], check=True)  # the CPU wheel, before TRL resolves
    subprocess.run(pip + [f"trl=={TRL_VERSION}", f"torch=={torch_version}"], check=True)
    subprocess.run(pip + ["--no-deps", "-e", REPO], check=True)
    subprocess.run(pip + ["lightning>=2.4", "hydra-core>=1.3.2", "torchmetrics>=1.4", f"torch=={torch_version}"],
                   check=True)
    return py


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def threads_of(framework: str, a) -> int:
    return a.trl_threads if framework == "trl" and a.trl_threads else a.threads


def run_worker(python: str, framework: str, size: str, algo: str, model_dir: str, a) -> dict:
    threads = threads_of(framework, a)
    cmd = [python, os.path.abspath(__file__), "--worker", framework, "--size", size, "--algo", algo,
           "--model-dir", model_dir, "--steps", str(a.steps_for[size]), "--threads", str(threads),
           "--worker-threads", str(a.worker_threads), "--rlopt-staleness", str(a.rlopt_staleness),
           "--rlopt-correction", a.rlopt_correction, "--dtype", a.dtype] + (["--borrow-threads"] if a.borrow_threads else []) + (
           ["--fixed-length"] if a.fixed_length else []) + [
           "--seed", str(a.seed), "--rlopt-rollout", a.rlopt_rollout] + (["--profile"] if a.profile else [])
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or "")[-3000:]
        raise RuntimeError(f"{framework} worker failed ({size}, {algo}, rc={p.returncode}):\n{tail}")
    if a.profile:
        print(p.stderr[-6000:], file=sys.stderr)
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_s"] = time.perf_counter() - t0
    res["loadavg"] = os.getloadavg()[0]
    return res


def summarise(res: dict, spec: dict, gflops_ceiling: float) -> dict:
    # steps 1 .. n-2: the first step's one-off costs out, and the last step out too (the async
    # pipeline has no next batch to sample during it: its window would hold one sampling less)
    times, n = res["times"][:-1], len(res["times"]) - 1
    per_step = spec["batch"] * spec["group"]
    dt = times[-1] - times[0]
    steps_timed = n - 1
    toks = sum(res["tokens"][1:n])
    ptoks = sum(res["prompt_tokens"][1:n])  # the reward sees one prompt per completion
    flops = 8 * res["params"] * (toks + ptoks)  # 2 (generation) + 6 (training) per token and parameter
    tail = max(1, min(5, len(res["rewards"])))
    return dict(samples_s=steps_timed * per_step / dt, tokens_s=toks / dt, step_s=dt / steps_timed,
                peak_rss=res["peak_rss"], rss_loaded=res["rss_loaded"],
                reward_first=statistics.mean(res["rewards"][:tail]), reward_last=statistics.mean(res["rewards"][-tail:]),
                reward_mean=statistics.mean(res["rewards"]), gflops=flops / dt / 1e9,
                ceiling_frac=flops / dt / 1e9 / gflops_ceiling, mean_len=toks / max(steps_timed * per_step, 1),
                process_s=res["process_s"], loadavg=res["loadavg"],
                rollout_s=statistics.median(res["rollout_s"][1:]) if len(res.get("rollout_s", [])) > 1 else float("nan"),
                update_s=statistics.median(res["update_s"][1:]) if len(res.get("update_s", [])) > 1 else float("nan"))


def reward_over_seeds(results: list[dict], frameworks: list[str], seeds: list[int]) -> None:
    """Mean reward per step over the run (the area under the curve, ``reward_mean``) and over its
    last 5 steps, per seed (mean of the repeats), then each rlopt variant minus TRL: the mean
    difference over seeds with its bootstrap interval (rlopt.stats.compare)."""
    from rlopt.stats import compare

    for r in results:
        per = {fw: {key: [statistics.mean(x[key] for x in r[fw]["runs"] if x["seed"] == s) for s in seeds]
                    for key in ("reward_mean", "reward_last")} for fw in frameworks}
        print(f"\n### reward over seeds {seeds}: {r['size']} {r['algo']}\n")
        print("| framework | mean reward over the run, per seed | mean | last 5 steps, per seed | mean |")
        print("|---|---|---|---|---|")
        for fw in frameworks:
            m, last = per[fw]["reward_mean"], per[fw]["reward_last"]
            print(f"| {fw} | {', '.join(f'{v:.3f}' for v in m)} | {statistics.mean(m):.3f} "
                  f"| {', '.join(f'{v:.3f}' for v in last)} | {statistics.mean(last):.3f} |")
        for fw in frameworks:
            if fw == "trl" or "trl" not in per:
                continue
            for key in ("reward_mean", "reward_last"):
                c = compare(per[fw][key], per["trl"][key])
                print(f"- {fw} - trl, {key}: {c['diff']:+.3f} [{c['diff_lo']:+.3f}, {c['diff_hi']:+.3f}]"
                      f"{' (resolved)' if c['resolved'] else ' (unresolved)'}")


def speed_ratios(results: list[dict], variants: list[str], floor: float) -> None:
    """Each rlopt run against the TRL run next to it (same seed and repeat, run one after the other):
    the per-pair samples/s ratios, their geometric mean with a 95% bootstrap interval (the mean of
    the log-ratios, rlopt.stats.interval) and a verdict against ``floor``: met (the interval above
    it), not met (below), unresolved (it straddles the floor). Pairs rather than medians, as the
    machine's speed drifts between pairs more than within one."""
    from rlopt.stats import interval

    for r in results:
        for fw in variants:
            pairs = list(zip(r[fw]["runs"], r["trl"]["runs"]))
            logs = [math.log(o["samples_s"] / t["samples_s"]) for o, t in pairs]
            line = f"- {r['size']} {r['algo']} {fw} / trl, samples/s per pair: {', '.join(f'{math.exp(v):.2f}x' for v in logs)}"
            if len(logs) < 2:
                print(f"{line}; {floor:g}x not judged (one pair)")
                continue
            iv = interval(logs)
            lo, mid, hi = (math.exp(iv[k]) for k in ("mean_lo", "mean", "mean_hi"))
            verdict = "met" if lo >= floor else "not met" if hi < floor else "unresolved"
            print(f"{line}; geometric mean {mid:.2f}x [{lo:.2f}, {hi:.2f}]: {floor:g}x {verdict}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--algos", default="grpo,gspo")
    ap.add_argument("--steps-tiny", type=int, default=SIZES["tiny"]["steps"])
    ap.add_argument("--steps-small", type=int, default=SIZES["small"]["steps"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1: on a shared 2-core machine two OpenMP threads "
                         "spin-waiting on each other measured several times slower, for both frameworks)")
    ap.add_argument("--trl-threads", type=int, default=None, help="TRL's torch threads (default: --threads)")
    ap.add_argument("--worker-threads", type=int, default=1,
                    help="rlopt_async: the rollout worker's torch threads (the trainer has --threads)")
    ap.add_argument("--borrow-threads", action="store_true",
                    help="rlopt_async: the update takes the worker's threads while the worker idles "
                         "(offpolicy.borrow_threads)")
    ap.add_argument("--rlopt-staleness", type=int, default=0,
                    help="rlopt (sync): offpolicy.staleness, e.g. 1 = the data of rlopt_async, sampled in-process")
    ap.add_argument("--fixed-length", action="store_true",
                    help="every completion runs to the budget in both frameworks (min_new_tokens = max_new_tokens): "
                         "the same tokens per step by construction")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both frameworks load the model in this dtype and train it there (bfloat16: pure bf16, "
                         "no float32 master weights, in both)")
    ap.add_argument("--rlopt-correction", default="none",
                    help="rlopt: behaviour correction for stale data (none, bypass = clip against the sampler, tis, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds (each its own warmed-up model, prompts and sampling): "
                         "the table pools all runs; a reward comparison over seeds follows it")
    ap.add_argument("--repeats", type=int, default=1, help="run each worker this many times; report the median")
    ap.add_argument("--rlopt-rollout", choices=["lean", "hf"], default="lean",
                    help="rlopt's rollout engine: lean (KVCacheSampler) or hf (model.generate)")
    ap.add_argument("--trl-venv", default=DEFAULT_VENV)
    ap.add_argument("--frameworks", default="rlopt,trl",
                    help="any of rlopt, rlopt_async (offpolicy.async: a rollout worker process), trl")
    ap.add_argument("--profile", action="store_true", help="torch profiler table of each worker (stderr)")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--floor", type=float, default=2.0, help="the samples/s ratio over TRL the verdict is against")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["rlopt", "rlopt_async", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--algo", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        res = (worker_trl if a.worker == "trl" else worker_rlopt)(a)
        res["peak_rss"] = _peak_rss_mb() + res.get("worker_peak_rss", 0.0)  # trainer + rollout worker
        print("RESULT " + json.dumps(res), flush=True)
        return

    a.steps_for = {"tiny": a.steps_tiny, "small": a.steps_small}
    sizes, algos = a.sizes.split(","), a.algos.split(",")
    frameworks = a.frameworks.split(",")
    pythons = {"rlopt": sys.executable, "rlopt_async": sys.executable}
    if "trl" in frameworks:
        pythons["trl"] = ensure_trl_venv(a.trl_venv)
    ceiling = matmul_gflops(a.threads, dtype=a.dtype)
    import platform

    import torch

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {a.threads} torch threads per worker; model in {a.dtype}; {a.dtype} matmul ceiling "
          f"{ceiling:.1f} GFLOP/s (torch.mm 2048^3, median of 5)", flush=True)
    t_start = time.perf_counter()
    results = []
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    for size in sizes:
        spec = SIZES[size]
        for algo in algos:
            row = dict(size=size, algo=algo)
            runs_of: dict[str, list[dict]] = {fw: [] for fw in frameworks}
            prompts_seen: set[tuple[int, tuple[str, ...]]] = set()  # (seed, each step's prompt fingerprint)
            for seed in seeds:
                a.seed = seed
                model_dir = prepare_model(size, seed)
                for _ in range(a.repeats):  # interleaved (A B A B ...), so load changes hit both alike
                    for fw in frameworks:
                        raw = run_worker(pythons[fw], fw, size, algo, model_dir, a)
                        prompts_seen.add((seed, tuple(raw["prompts"])))
                        runs_of[fw].append(dict(summarise(raw, spec, ceiling), seed=seed))
            row["same_prompts"] = len(prompts_seen) == len(seeds)  # every run of a seed saw the same prompts
            print(f"  {size} {algo}: the same prompts at every step in every run of a seed: "
                  f"{'yes' if row['same_prompts'] else 'NO'}", flush=True)
            for fw in frameworks:
                runs = runs_of[fw]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "seed"}
                med["runs"] = runs
                med["samples_s_all"] = [round(r["samples_s"], 2) for r in runs]
                row[fw] = med
                print(f"  {size:5s} {algo:4s} {fw:5s}: {med['samples_s']:7.2f} samples/s {med['tokens_s']:8.1f} tok/s "
                      f"{med['step_s']:6.2f} s/step  peak RSS {med['peak_rss']:6.0f} MB (after load "
                      f"{med['rss_loaded']:5.0f})  reward {med['reward_first']:.3f} -> {med['reward_last']:.3f}  "
                      f"{med['gflops']:.2f} nominal GFLOP/s = {100 * med['ceiling_frac']:.1f}% of ceiling  "
                      f"(process {med['process_s']:.0f}s; runs {med['samples_s_all']}; 1-min load average after "
                      f"{med['loadavg']:.1f}" + (f"; rollout {med['rollout_s']:.2f}s + update {med['update_s']:.2f}s "
                                                  "per step" if fw == "rlopt" else "") + ")", flush=True)
            results.append(row)

    print(f"\n## rlopt ({a.rlopt_rollout} rollout) vs TRL {TRL_VERSION}: {a.threads} threads, ceiling {ceiling:.1f} "
          f"GFLOP/s; total {time.perf_counter() - t_start:.0f}s\n")
    variants = [fw for fw in ("rlopt", "rlopt_async") if fw in frameworks]
    if "trl" in frameworks and variants:
        print("| size | algo | steps | rlopt variant (threads) | rlopt samples/s | TRL samples/s (threads) | ratio "
              "| rlopt tok/s | TRL tok/s | tok/s ratio | rlopt peak RSS MB | TRL peak RSS MB | rlopt reward (first->last 5 steps) "
              "| TRL reward | rlopt % ceiling | TRL % ceiling |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            t = r["trl"]
            for fw in variants:
                o = r[fw]
                label = (f"async ({a.threads} trainer + {a.worker_threads} worker)" if fw == "rlopt_async"
                         else f"sync ({a.threads})")
                print(f"| {r['size']} | {r['algo']} | {a.steps_for[r['size']]} | {label} | {o['samples_s']:.2f} "
                      f"| {t['samples_s']:.2f} ({threads_of('trl', a)}) | **{o['samples_s'] / t['samples_s']:.2f}x** "
                      f"| {o['tokens_s']:.0f} | {t['tokens_s']:.0f} | {o['tokens_s'] / t['tokens_s']:.2f}x | {o['peak_rss']:.0f} | {t['peak_rss']:.0f} "
                      f"| {o['reward_first']:.3f} -> {o['reward_last']:.3f} | {t['reward_first']:.3f} -> "
                      f"{t['reward_last']:.3f} | {100 * o['ceiling_frac']:.1f}% | {100 * t['ceiling_frac']:.1f}% |")
        print()
        speed_ratios(results, variants, a.floor)
    if len(seeds) > 1:
        reward_over_seeds(results, frameworks, seeds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(ceiling_gflops=ceiling, threads=a.threads, results=results), f, indent=1)


if __name__ == "__main__":
    main()
