"""Soak benchmark: the default job for 2,000 rollout steps, checking that memory does not grow
and no file handles leak.

    python benchmarks/soak.py                 # 2,000 steps of the default run (about 4 min per 1,000 steps on 2 cores)
    python benchmarks/soak.py --steps 300 --every 50 rlopt-overrides...

Every ``--every`` steps it prints the current and peak RSS (``/proc/self/status``: VmRSS,
VmHWM) and the number of open file descriptors (``/proc/self/fd``); at the end it compares the
second half of the run with the first half. Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import lightning as L


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024  # MiB
    out["fds"] = len(os.listdir("/proc/self/fd"))
    return out


class Probe(L.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.rows, self.t0 = every, [], time.time()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            s = _status()
            self.rows.append((step, s["VmRSS"], s["VmHWM"], s["fds"]))
            print(f"step {step:6d}  rss {s['VmRSS']:8.1f} MiB  peak rss {s['VmHWM']:8.1f} MiB  "
                  f"open fds {s['fds']:4d}  elapsed {time.time() - self.t0:7.1f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("overrides", nargs="*", help="extra rlopt-train overrides")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import rlopt.conf  # noqa: F401 - resolvers
    from rlopt.train import CONFIG_DIR, build

    out = tempfile.mkdtemp(prefix="rlopt-soak-")
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", return_hydra_config=True, overrides=[
            f"steps={args.steps}", f"output_dir={out}", "run_name=soak", "trainer.enable_progress_bar=false",
            f"checkpoint_every={args.every * 5}", *args.overrides])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out
    HydraConfig().set_config(cfg)
    module, dm, trainer = build(cfg)
    probe = Probe(args.every)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=dm)
    rows = probe.rows
    if len(rows) >= 4:
        half = len(rows) // 2
        first = max(r[1] for r in rows[:half])
        second = max(r[1] for r in rows[half:])
        print(f"max rss first half {first:.1f} MiB, second half {second:.1f} MiB "
              f"(growth {second - first:+.1f} MiB); fds {rows[0][3]} -> {rows[-1][3]}")
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
