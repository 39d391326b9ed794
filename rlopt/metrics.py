"""Training metrics: accumulate the objective's metrics over the updates of a rollout step,
assemble every step's scalars over all ranks, and hand them to the loggers.

    acc = MetricAccumulator()
    acc.add(metrics, tokens=..., seqs=...)                    # after each micro-batch
    scalars = step_scalars(module, traj, acc)                 # one device sync, all ranks reduced
    log_step(module, traj, scalars, acc)                      # history, Lightning loggers, TensorBoard extras

Every scalar is over the whole rollout batch of all ranks: sums and counts are all-reduced.
The ``loss/*`` values are additive (each micro-batch's share of its update's loss under the
global normaliser): summed over micro-batches and ranks and averaged over the updates.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import ranks
from .trajectory import Trajectory


def repeat_each(xs: list[Any], k: int) -> list[Any]:
    """Each item ``k`` times in a row: per-prompt columns aligned with contiguous groups."""
    return [x for x in xs for _ in range(k)]


class MetricAccumulator:
    """Token- / sequence-weighted means of the objective's metrics over all minibatch updates of a
    rollout step and all ranks' rows; ``ratio/min|max`` as extremes; ``loss/*`` per update."""

    def __init__(self) -> None:
        self.updates = 0  # optimizer updates (the same number on every rank)
        self.sums: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        self.mins: dict[str, Tensor] = {}
        self.maxs: dict[str, Tensor] = {}
        self.ratios: list[Tensor] = []  # token ratios of the updates, kept on logging steps only

    def add(self, metrics: dict[str, Tensor], tokens: Tensor, seqs: Tensor) -> None:
        for k, v in metrics.items():
            if k == "ratio/min":
                self.mins[k] = v if k not in self.mins else torch.minimum(self.mins[k], v)
            elif k == "ratio/max":
                self.maxs[k] = v if k not in self.maxs else torch.maximum(self.maxs[k], v)
            elif k.startswith("loss/"):
                self.sums[k] = self.sums.get(k, 0) + v
                self.weights[k] = 0.0  # divided by the number of updates instead
            else:
                w = seqs if k.startswith("clip/seq_") else tokens
                self.sums[k] = self.sums.get(k, 0) + v * w
                self.weights[k] = self.weights.get(k, 0) + w

    def add_scalar(self, key: str, value: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0) + value.float()
        self.weights[key] = self.weights.get(key, 0) + 1.0

    def compute(self, reduce_sum: Callable[[Tensor], Tensor] = ranks.reduce_sum) -> dict[str, Tensor]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        s = torch.stack([torch.as_tensor(self.sums[k]).float().reshape(()) for k in keys])
        w = torch.stack([torch.as_tensor(self.weights[k]).float().reshape(()).to(s.device) for k in keys])
        s, w = reduce_sum(s), reduce_sum(w)
        out = {k: v / max(self.updates, 1) if k.startswith("loss/") else v / wk.clamp(min=1e-12)
               for k, v, wk in zip(keys, s, w)}
        for store, reduce in ((self.mins, ranks.reduce_min), (self.maxs, ranks.reduce_max)):
            for k, v in store.items():
                out[k] = reduce(v)
        return out


def step_scalars(module: Any, traj: Trajectory, acc: MetricAccumulator) -> dict[str, float]:
    """Every scalar of one rollout step (reward, lengths, the objective's metrics, timings), reduced
    over all ranks, as Python floats (one device sync for all of them)."""
    g, dev = module.group_size, module.device
    ro, rewards, mask, adv = traj.completions, traj.rewards, traj.loss_mask, traj.advantages
    lens = traj.completion_lengths()  # [N]
    grp_std = rewards.view(-1, g).std(-1)  # [B]
    sums = {
        "reward/mean": (rewards.sum(), rewards.numel()),
        "reward/sq": ((rewards ** 2).sum(), rewards.numel()),
        "reward/zero_std_groups": ((grp_std < 1e-8).float().sum(), grp_std.numel()),
        "reward/invalid": ((~traj.valid).float().sum(), traj.valid.numel()),
        "completion/length_mean": (lens.sum(), lens.numel()),
        "completion/truncated": (ro.truncated.float().sum(), lens.numel()),
    }
    for k, v in traj.reward_components.items():
        sums[f"reward/{k}"] = (v.sum(), v.numel())
    if module.accuracy_fn is not None:
        a = torch.tensor(module.accuracy_fn(repeat_each(traj.prompts, g), traj.texts,
                                            **{k: repeat_each(v, g) for k, v in traj.columns.items()}),
                         dtype=torch.float32)
        sums["accuracy/train"] = (a.sum().to(dev), a.numel())
        wrong = (a.to(dev) < 1).float()  # [N] completions that are not exactly right
        sums["completion/length_incorrect"] = ((lens * wrong).sum(), wrong.sum())  # the length-bias signal
        sums["completion/length_correct"] = ((lens * (1 - wrong)).sum(), (1 - wrong).sum())
    a_m = adv * mask  # over the whole batch (the objective's per-minibatch std is not additive)
    sums["advantage/mean"] = (a_m.sum(), mask.sum())
    sums["advantage/sq"] = ((a_m * adv).sum(), mask.sum())
    out = acc.compute(ranks.reduce_sum)
    keys = list(sums)
    packed = torch.stack([torch.as_tensor(s, dtype=torch.float32, device=dev) for s, _ in sums.values()]
                         + [torch.tensor(float(c), device=dev) for _, c in sums.values()])
    packed = ranks.reduce_sum(packed)
    vals = packed[: len(keys)] / packed[len(keys):].clamp(min=1)
    for k, v in zip(keys, vals):
        out[k] = v
    out.update(rollout_scalars(traj))  # after the batch sums: dynamic sampling's reward/zero_std_groups is before its filter
    out["reward/std"] = (out.pop("reward/sq") - out["reward/mean"] ** 2).clamp(min=0).sqrt()
    out["advantage/std"] = (out.pop("advantage/sq") - out["advantage/mean"] ** 2).clamp(min=0).sqrt()
    t_gen, t_upd = ranks.reduce_max(torch.tensor([traj.timings["rollout"], traj.timings["update"]],
                                                 device=dev)).tolist()  # slowest rank
    out["completion/length_max"] = ranks.reduce_max(lens.max())
    total_tok = ranks.reduce_sum(lens.sum())
    n_all = float(lens.numel() * ranks.world_size())
    out["perf/samples_per_s"] = torch.tensor(n_all / max(t_gen + t_upd, 1e-9))
    out["perf/tokens_per_s"] = total_tok / max(t_gen + t_upd, 1e-9)
    out["perf/rollout_s"] = torch.tensor(t_gen)
    out["perf/update_s"] = torch.tensor(t_upd)
    out["lr"] = torch.tensor(module.optimizers().optimizer.param_groups[0]["lr"])
    out["train/skipped_updates"] = torch.tensor(float(module.skipped_updates))
    out["offpolicy/staleness_mean"] = ranks.reduce_sum(torch.tensor(float(traj.staleness))) / ranks.world_size()
    out["offpolicy/staleness_max"] = ranks.reduce_max(torch.tensor(float(traj.staleness)))
    keys = list(out)
    on_dev = [k for k in keys if torch.is_tensor(out[k]) and out[k].device.type != "cpu"]
    got = dict(zip(on_dev, torch.stack([out[k].float().reshape(()) for k in on_dev]).tolist())) if on_dev else {}
    return {k: got[k] if k in got else float(out[k]) for k in keys}


def rollout_scalars(traj: Trajectory) -> dict[str, Tensor]:
    """The collect phase's metrics over all ranks: ``mismatch/*``, ``sampling/*`` and ``reward/*`` are already exact; the behaviour
    correction's and the masks' (computed on each rank's rows) are combined as means weighted by the
    rank's completion tokens, ``*_min`` / ``*_max`` as extremes. Exact on one process and for the
    correction's token-level means; across ranks the effective sample size, the per-sequence
    fractions and the masks' fractions (whose denominators are not the completion tokens) are
    approximations. The update itself is exact (tests/test_distributed.py)."""
    out, means = {}, {}
    tokens = traj.completions.completion_mask.sum().float()
    for k, v in traj.rollout_metrics.items():
        if k.startswith(("mismatch/", "sampling/", "reward/")):  # already reduced over ranks
            out[k] = v
        elif k.endswith("_min"):
            out[k] = ranks.reduce_min(v.float())
        elif k.endswith("_max"):
            out[k] = ranks.reduce_max(v.float())
        else:
            means[k] = v.float()
    if means:
        packed = ranks.reduce_sum(torch.stack([*(v * tokens for v in means.values()), tokens]))
        out.update({k: s / packed[-1].clamp(min=1) for k, s in zip(means, packed[:-1])})
    return out


def log_step(module: Any, traj: Trajectory, scalars: dict[str, float], acc: MetricAccumulator) -> None:
    """Keep the step's scalars in ``module.history``; hand them to Lightning's loggers on the steps
    those write; the reward to the progress bar; ratio histograms and sample tables to TensorBoard
    every ``log_samples_every`` steps."""
    module.history.append(scalars)
    n = len(traj.prompts)
    # Lightning's self.log costs ~0.25 ms a key: hand it the scalars only on the steps its loggers write
    # (trainer.log_every_n_steps; configs/trainer sets 1); the history above keeps every step's values.
    if should_update_logs(module.trainer):
        module.log_dict(scalars, on_step=True, on_epoch=False, batch_size=n)
    module.log("reward", scalars["reward/mean"], prog_bar=True, logger=False, on_step=True, batch_size=n)
    # this rollout's index: the closing optimizer step already advanced global_step
    step = module.global_step - 1
    if module.log_samples_every > 0 and step % module.log_samples_every == 0 and module.global_rank == 0:
        tb = tensorboard(module)
        if tb is not None:
            if acc.ratios:
                tb.add_histogram("ratio/token_hist", torch.cat(acc.ratios), step)
            g = module.group_size
            rows = [f"| {p!r} | {t!r} | {r:.3f} |" for p, t, r in
                    zip(repeat_each(traj.prompts, g)[:8], traj.texts[:8], traj.rewards[:8].tolist())]
            tb.add_text("samples", "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(rows), step)


def should_update_logs(trainer: Any) -> bool:
    """Whether Lightning's loggers write this step's scalars: Lightning's own test (every
    ``log_every_n_steps``-th step, or a step after which ``should_stop`` is already set). With
    ``log_every_n_steps`` > 1, ``trainer.callback_metrics`` (what ``ModelCheckpoint`` /
    ``EarlyStopping`` monitors read) therefore holds the last *logged* step's training scalars,
    and a step stopped by a callback during that step (preemption) is not written; validation
    metrics are unaffected and ``module.history`` holds every step."""
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own test, in the same loop state
    return bool(getattr(connector, "should_update_logs", True)) or bool(getattr(trainer, "fast_dev_run", False))


def tensorboard(module: Any) -> Any:
    """The first logger experiment that can take histograms (TensorBoard's SummaryWriter), or None."""
    for lg in module.loggers:
        exp = getattr(lg, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram"):
            return exp
    return None


def validate(module: Any, batch: dict[str, list[Any]]) -> None:
    """One validation batch: greedy and sampled completions (one per prompt), their reward and
    accuracy accumulated in ``module.val_metrics`` and logged as ``val/*`` (epoch means)."""
    prompts = batch["prompt"]
    columns = {k: v for k, v in batch.items() if k != "prompt"}
    for mode in ("greedy", "sampled"):
        ro = module.sample(prompts, 1, greedy=mode == "greedy")
        texts = module.decode(ro)
        rewards, _, _ = module.score(prompts, ro, texts, columns, 1)
        module.val_metrics[f"reward_{mode}"].update(rewards)
        if module.accuracy_fn is not None:
            a = torch.tensor(module.accuracy_fn(prompts, texts, **columns), dtype=torch.float32, device=module.device)
            module.val_metrics[f"accuracy_{mode}"].update(a)
    for k, m in module.val_metrics.items():
        if k.startswith("reward") or module.accuracy_fn is not None:
            module.log(f"val/{k}", m, on_step=False, on_epoch=True, batch_size=len(prompts))
