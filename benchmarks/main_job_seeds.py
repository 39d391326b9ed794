"""The main job across seeds: ``rlopt-train`` with its defaults for seeds 0-9, one subprocess each.

    python benchmarks/main_job_seeds.py                                  # seeds 0-9, one at a time
    python benchmarks/main_job_seeds.py --seeds 0-4 --jobs 2 --out /tmp/seeds
    python benchmarks/main_job_seeds.py --plot docs/main_job_reward.png

Each run is ``rlopt-train seed=S hydra.run.dir=OUT/seed_S`` (nothing else overridden: the
TensorBoard logger, checkpoints and export stay as the default has them), timed from start to
exit. The script parses the run's summary lines (``[rlopt] N steps; mean reward first 10 steps X
-> last 10 steps Y``, ``[rlopt] val/... = v``), reads the per-step ``reward/mean`` from the run's
TensorBoard log with tbparse, and prints a markdown table, the minimum over seeds and whether the
floor of issue 15 holds: for every seed a last-10-step mean reward >= 0.8, a held-out greedy
exact-match accuracy (``val/accuracy_greedy``, the last validation) >= 0.5 and a wall time
<= 180 s. The wall column means something only on an otherwise idle machine with ``--jobs 1``;
the runs inherit the environment, ``OMP_NUM_THREADS`` included (printed under the table): on a
2-core machine that something else keeps busy, torch's default of one thread per core made a
step of the tiny model ~30x slower than ``OMP_NUM_THREADS=1`` (7 s instead of 0.2 s).

Written under ``--out``: ``table.md``, ``seeds.csv`` (the table), ``rewards.csv`` (seed, step,
reward/mean), ``summary.json`` (rows, reward histories, floor) and ``seed_S/`` (each run's
folder with its ``stdout.txt``). ``--plot PATH`` also writes the mean reward curve over seeds with
a 95% t-interval band (scipy.stats.t) as a PNG.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

FLOOR_REWARD, FLOOR_ACCURACY, FLOOR_WALL_S = 0.8, 0.5, 180.0
SUMMARY = re.compile(r"^\[rlopt\] (\d+) steps; mean reward first 10 steps (\S+) -> last 10 steps (\S+)")
VAL = re.compile(r"^\[rlopt\] (val/\w+) = (\S+)")
TB = re.compile(r"^\[rlopt\] TensorBoard logs: (\S+)")
COLUMNS = ["seed", "first10", "last10", "val_reward_greedy", "val_accuracy_greedy", "wall_s"]
HEADERS = ["seed", "first-10 reward", "last-10 reward", "val reward greedy", "val accuracy greedy", "wall s"]


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,5"`` or ``"0-2,7"`` -> a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def parse_output(text: str) -> dict[str, Any]:
    """The summary lines of one run's stdout."""
    out: dict[str, Any] = {"val": {}}
    for line in text.splitlines():
        if m := SUMMARY.match(line):
            out["steps"], out["first10"], out["last10"] = int(m[1]), float(m[2]), float(m[3])
        elif m := VAL.match(line):
            out["val"][m[1]] = float(m[2])
        elif m := TB.match(line):
            out["log_dir"] = m[1]
    return out


def reward_history(log_dir: str | None) -> list[float]:
    """``reward/mean`` per rollout step from a run's TensorBoard log (empty when there is none)."""
    if not log_dir or not os.path.isdir(log_dir):
        return []
    from tbparse import SummaryReader

    df = SummaryReader(log_dir).scalars
    if df.empty:
        return []
    df = df[df.tag == "reward/mean"].sort_values("step")
    return [float(v) for v in df.value]


def run_seed(seed: int, out: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = os.path.abspath(os.path.join(out, f"seed_{seed}"))
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale tiny_model / log folder would be reused
    os.makedirs(run_dir)
    exe = shutil.which("rlopt-train")
    cmd = [exe] if exe else [sys.executable, "-m", "rlopt.train"]
    cmd += [f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(run_dir, "stdout.txt"), "w") as f:
        f.write(proc.stdout)
    parsed = parse_output(proc.stdout)
    row = {"seed": seed, "first10": parsed.get("first10", math.nan), "last10": parsed.get("last10", math.nan),
           "val_reward_greedy": parsed["val"].get("val/reward_greedy", math.nan),
           "val_accuracy_greedy": parsed["val"].get("val/accuracy_greedy", math.nan),
           "wall_s": wall, "steps": parsed.get("steps"), "returncode": proc.returncode}
    row["history"] = reward_history(parsed.get("log_dir"))
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see {run_dir}/stdout.txt)"
    print(f"seed {seed}: last-10 reward {row['last10']:.3f}, greedy accuracy {row['val_accuracy_greedy']:.3f}, "
          f"{wall:.0f} s {status}", file=sys.stderr, flush=True)
    return row


def floor_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def ok(key: str, bound: float, above: bool) -> bool:
        vals = [r[key] for r in rows]
        return all(not math.isnan(v) and (v >= bound if above else v <= bound) for v in vals)

    res = {"last10": ok("last10", FLOOR_REWARD, True), "accuracy": ok("val_accuracy_greedy", FLOOR_ACCURACY, True),
           "wall": ok("wall_s", FLOOR_WALL_S, False), "all_exit_0": all(r["returncode"] == 0 for r in rows)}
    res["holds"] = all(res.values())
    return res


def markdown(rows: list[dict[str, Any]], floor: dict[str, Any]) -> str:
    def fmt(key: str, v: float) -> str:
        return "nan" if isinstance(v, float) and math.isnan(v) else (f"{v:.0f}" if key == "wall_s" else f"{v:.3f}")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["seed"])] + [fmt(k, r[k]) for k in COLUMNS[1:]]) + " |")
    mins = {k: min(r[k] for r in rows) for k in COLUMNS[1:]}
    lines.append("| **min** | " + " | ".join(fmt(k, mins[k]) for k in COLUMNS[1:-1])
                 + f" | max {fmt('wall_s', max(r['wall_s'] for r in rows))} |")
    verdict = "HOLDS" if floor["holds"] else "FAILS"
    lines.append("")
    lines.append(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    lines.append(f"Floor (every seed: last-10 reward >= {FLOOR_REWARD}, val accuracy greedy >= {FLOOR_ACCURACY}, "
                 f"wall <= {FLOOR_WALL_S:.0f} s): **{verdict}** (reward {'ok' if floor['last10'] else 'no'}, "
                 f"accuracy {'ok' if floor['accuracy'] else 'no'}, wall {'ok' if floor['wall'] else 'no'}"
                 + ("" if floor["all_exit_0"] else ", some runs failed") + ")")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Mean ``reward/mean`` over seeds per step with a 95% t-interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    hists = [r["history"] for r in rows if r["history"]]
    if not hists:
        print(f"no reward histories: {path} not written", file=sys.stderr)
        return
    n_steps = min(len(h) for h in hists)
    h = np.array([x[:n_steps] for x in hists])  # [seeds, steps]
    n = h.shape[0]
    mean = h.mean(0)
    steps = np.arange(1, n_steps + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    if n > 1:
        half = stats.t.ppf(0.975, n - 1) * h.std(0, ddof=1) / np.sqrt(n)
        ax.fill_between(steps, mean - half, mean + half, alpha=0.25, label="95% t-interval of the mean")
    ax.plot(steps, mean, lw=1.5, label=f"mean over {n} seeds")
    ax.axhline(FLOOR_REWARD, color="grey", ls="--", lw=0.8, label=f"floor {FLOOR_REWARD}")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("training reward (reward/mean)")
    ax.set_ylim(0, 1)
    ax.set_title("rlopt-train (defaults): training reward across seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 (default), 0,3,5")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (1: the wall column is meaningful)")
    ap.add_argument("--out", default="outputs/main_job_seeds", help="folder for the runs, table and histories")
    ap.add_argument("--plot", default=None, help="write the mean reward curve with a 95%% band to this PNG")
    ap.add_argument("overrides", nargs="*", help="extra rlopt-train overrides (none for the main job's floor)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda s: run_seed(s, args.out, args.overrides), args.seeds))
    rows.sort(key=lambda r: r["seed"])
    floor = floor_check(rows)
    table = markdown(rows, floor)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "seeds.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + ["steps", "returncode"])
        for r in rows:
            w.writerow([r[k] for k in COLUMNS + ["steps", "returncode"]])
    with open(os.path.join(args.out, "rewards.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "step", "reward_mean"])
        for r in rows:
            w.writerows([r["seed"], i + 1, v] for i, v in enumerate(r["history"]))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"overrides": args.overrides, "jobs": args.jobs, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "floor": floor,
                   "bounds": {"last10": FLOOR_REWARD, "accuracy": FLOOR_ACCURACY, "wall_s": FLOOR_WALL_S},
                   "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0 if floor["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
