"""What carrying the sampler's log-probs (mu) costs a training step, side by side in one process.

    python benchmarks/sampler_logp_cost.py                       # the main job's config, 60 steps
    python benchmarks/sampler_logp_cost.py --steps 100 algorithm=gspo

One module is built from the real config (the default unless overrides are given), and rollout
steps alternate between the engine recording mu (``rollout.sampler_logp=true``, the default:
a gather and a log per decoding step, the mismatch metrics after the update) and not recording
it. Alternating A/B steps in one process shares the machine's noise between the two arms; the
printed figure is the ratio of median step times with a bootstrap 95% interval over steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from scipy.stats import bootstrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="rollout steps per arm")
    ap.add_argument("--warmup", type=int, default=5, help="steps per arm not counted")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    a = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from rlopt.train import CONFIG_DIR, build

    out = tempfile.mkdtemp(prefix="logp-cost-")
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=[f"output_dir={out}", "logger=none", "callbacks=none", "export_dir=null",
                                          f"steps={2 * (a.steps + a.warmup)}", "val_every=100000", *a.overrides])
    module, dm, trainer = build(cfg)
    times: dict[bool, list[float]] = {True: [], False: []}

    class Alternate(__import__("lightning").Callback):
        def on_train_batch_start(self, tr, pl_module, batch, batch_idx):
            pl_module.rollout.sampler_logp = tr.global_step % 2 == 0
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, tr, pl_module, outputs, batch, batch_idx):
            step = tr.global_step - 1
            if step >= 2 * a.warmup:
                times[step % 2 == 0].append(time.perf_counter() - self.t0)

    trainer.callbacks.append(Alternate())
    trainer.fit(module, datamodule=dm)
    with_mu, without = np.array(times[True]), np.array(times[False])
    ratio = statistics.median(with_mu) / statistics.median(without)
    ci = bootstrap((with_mu, without), lambda x, y, axis=-1: np.median(x, axis=axis) / np.median(y, axis=axis),
                   vectorized=True, paired=False, n_resamples=4999, random_state=0).confidence_interval
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, overrides: {' '.join(a.overrides) or '(default)'}")
    print("| arm | steps | median step ms |\n|---|---|---|")
    print(f"| sampler log-probs recorded | {len(with_mu)} | {1e3 * statistics.median(with_mu):.1f} |")
    print(f"| not recorded | {len(without)} | {1e3 * statistics.median(without):.1f} |")
    print(f"cost: median step time ratio {ratio:.4f} (95% CI {ci.low:.4f}-{ci.high:.4f}), "
          f"i.e. {100 * (ratio - 1):+.2f}% of a step")


if __name__ == "__main__":
    main()
