"""PolicyOptModule: a LightningModule that trains a causal LM with any composed algorithm.

    advantage, objective = build_preset("gspo")
    module = PolicyOptModule(policy, tokenizer, advantage, objective,
                             rewards=RewardSet({"match": partial_match}), group_size=4,
                             ppo_epochs=1, num_minibatches=4)
    L.Trainer(max_steps=200).fit(module, datamodule=dm)

One training step = one rollout: sample G completions per prompt -> rewards -> advantages ->
old (and reference) log-probs -> ``ppo_epochs`` x ``num_minibatches`` optimizer updates with
gradient clipping. ``trainer.global_step`` counts rollouts: the updates are taken on the
wrapped torch optimizer and one Lightning optimizer step (with no gradients, a no-op) closes
the rollout. Loss normalisers are counted over the whole rollout batch on all ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Mapping

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from .algorithms import AdvantageEstimator, PolicyObjective, SeqMeanTokenSumNorm, token_logprobs
from .algorithms.lm_head import auto_chunk_rows, chunked_lm_head_logprobs, saved_rows_for, split_causal_lm
from .algorithms.registry import check_range
from .models import is_peft
from .rewards import RewardSet
from .rollout import HFGenerate, Rollout, RolloutEngine
from .shared_prompt import PromptPlan, completion_states, prompt_plan, supports_shared_prompt
from . import distributed as _dist


class PolicyOptModule(L.LightningModule):
    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        advantage: AdvantageEstimator,
        objective: PolicyObjective,
        rewards: RewardSet,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        rollout: RolloutEngine | None = None,
        group_size: int = 4,
        ppo_epochs: int = 1,
        num_minibatches: int = 1,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        mask_truncated: bool = False,
        accuracy_fn: Callable[..., list[float]] | None = None,
        log_samples_every: int = 50,
        log_entropy: bool = True,
        max_consecutive_skips: int = 5,
        seed: int = 0,
        chunked_lm_head: bool = False,
        lm_head_chunk_rows: int | None = None,
        lm_head_saved_mib: float = 0.0,
        share_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = _prepare_tokenizer(tokenizer)
        self.advantage = advantage
        self.objective = objective
        self.rewards = rewards
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-5))
        self.scheduler_factory = scheduler
        self.rollout = rollout or HFGenerate()
        self.group_size = int(group_size)
        self.ppo_epochs = int(ppo_epochs)
        self.num_minibatches = int(num_minibatches)
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.mask_truncated = bool(mask_truncated)
        self.accuracy_fn = accuracy_fn
        self.log_samples_every = int(log_samples_every)
        self.log_entropy = bool(log_entropy)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_updates = 0  # non-finite updates skipped so far (saved in checkpoints)
        self._consecutive_skips = 0
        self.seed = int(seed)
        # chunked LM head: log-probs from hidden states without the full [n, T, V] logits (lm_head.py)
        self.chunked_lm_head = bool(chunked_lm_head)
        self.lm_head_chunk_rows = lm_head_chunk_rows
        self.lm_head_saved_mib = float(check_range("lm_head_saved_mib", lm_head_saved_mib, low=0.0))
        # one forward per distinct prompt, shared by its G completions (shared_prompt.py)
        self.share_prompt = bool(share_prompt)
        self._shared_ok: dict[int, bool] = {}  # per model: does the shared-prompt forward apply
        advantage.check_group_size(self.group_size)
        agg = objective.aggregation
        if isinstance(agg, SeqMeanTokenSumNorm) and agg.max_len is None:
            agg.max_len = self.rollout.max_new_tokens  # Dr. GRPO's constant: the generation budget
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs={ppo_epochs} must be >= 1")
        if self.num_minibatches < 1:
            raise ValueError(f"num_minibatches={num_minibatches} must be >= 1")
        # A reference policy exists only when the KL term is active (a frozen copy of the start).
        self.ref_policy = None
        self.history: list[dict[str, float]] = []  # every step's logged scalars (kept in checkpoints)
        # With LoRA the reference is the base model with the adapter disabled: no second copy.
        self.ref_via_adapter = objective.needs_reference and is_peft(policy)
        if objective.needs_reference and not self.ref_via_adapter:
            self.ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in (
            "reward_greedy", "reward_sampled", "accuracy_greedy", "accuracy_sampled")})
        self.save_hyperparameters(ignore=["policy", "tokenizer", "advantage", "objective", "rewards",
                                          "optimizer", "scheduler", "rollout", "accuracy_fn"])

    # ----------------------------------------------------------------------------- set-up
    @property
    def reward_history(self) -> list[float]:
        return [h["reward/mean"] for h in self.history]

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the sampling policy is the updated one, ratio == 1 exactly."""
        return self.ppo_epochs == 1 and self.num_minibatches == 1

    def configure_model(self) -> None:
        """FSDP / FSDP2: shard the policy and the frozen reference per decoder block (rlopt.distributed);
        a no-op under any other strategy. Runs before ``configure_optimizers``."""
        _dist.configure_sharding(self)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def _reduce_sum(self, t: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    # ----------------------------------------------------------------------------- pieces
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def sample(self, prompts: list[str], num_samples: int, greedy: bool = False) -> Rollout:
        ids, mask = self.encode_prompts(prompts)
        # sharded weights: every decoding step is a collective, so ranks step together until all are done
        synced = {"synced_gpus": True} if _dist.synced_generation(self.policy) else {}
        with _dist.generation_model(self.policy) as model:
            return self.rollout.generate(model, ids, mask, num_samples, eos_token_id=self.tokenizer.eos_token_id,
                                         pad_token_id=self.tokenizer.pad_token_id, greedy=greedy, **synced)

    def make_rollout(self, batch: dict[str, list[Any]]) -> tuple[Rollout, list[str]]:
        """Step 1 of a training step: ``group_size`` samples per prompt (groups contiguous) and their
        texts. A seam: override it to train on given completions (tests feed a fixed batch)."""
        ro = self.sample(batch["prompt"], self.group_size)
        return ro, self.decode(ro)

    def decode(self, ro: Rollout) -> list[str]:
        return self.tokenizer.batch_decode(ro.completion_ids.tolist(), skip_special_tokens=True)

    def score(self, prompts: list[str], ro: Rollout, texts: list[str], columns: Mapping[str, list[Any]],
              repeat: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        cols = {k: _repeat(v, repeat) for k, v in columns.items()}
        lengths = ro.completion_mask.sum(-1).tolist()
        total, per_fn, valid = self.rewards(_repeat(prompts, repeat), texts, completion_lengths=lengths, **cols)
        return total.to(self.device), {k: v.to(self.device) for k, v in per_fn.items()}, valid.to(self.device)

    def completion_logprobs(self, model: torch.nn.Module, ro: Rollout, with_entropy: bool = False
                            ) -> tuple[Tensor, Tensor | None]:
        """Log-probs ``[n, T]`` (and entropy) of the completion tokens under ``model``. Columns that
        are padding in every row (left of the longest prompt, right of the longest completion) are
        not computed: their values are 0 (every objective masks them)."""
        t = ro.completion_ids.shape[1]
        ro = _trim_padding(ro)
        logp, ent = self._completion_logprobs(model, ro, with_entropy)
        if ro.completion_ids.shape[1] < t:
            pad = (0, t - ro.completion_ids.shape[1])
            logp, ent = F.pad(logp, pad), None if ent is None else F.pad(ent, pad)
        return logp, ent

    def _completion_logprobs(self, model: torch.nn.Module, ro: Rollout, with_entropy: bool
                             ) -> tuple[Tensor, Tensor | None]:
        plan = self._prompt_plan(model, ro)
        if self.chunked_lm_head:  # pad positions get 0 (every objective masks them)
            decoder, weight, bias = split_causal_lm(model)
            hid = completion_states(decoder, ro, plan, hidden=True)  # [n, T, H]
            rows = self.lm_head_chunk_rows or auto_chunk_rows(weight.shape[0])
            saved = saved_rows_for(weight.shape[0], self.lm_head_saved_mib, weight.dtype)
            out = chunked_lm_head_logprobs(hid, weight, ro.completion_ids, bias, self.rollout.temperature,
                                           chunk_rows=rows, return_entropy=with_entropy, mask=ro.completion_mask,
                                           saved_rows=saved)
            return out if with_entropy else (out, None)
        logits = completion_states(model, ro, plan)  # [n, T, V]
        if with_entropy:
            return token_logprobs(logits, ro.completion_ids, self.rollout.temperature, return_entropy=True)
        return token_logprobs(logits, ro.completion_ids, self.rollout.temperature), None

    def _prompt_plan(self, model: torch.nn.Module, ro: Rollout) -> PromptPlan | None:
        """Which rows share a prompt, when the shared-prompt forward applies: ``share_prompt`` on,
        unsharded weights (FSDP's per-forward collectives are left alone) and a model that
        ``supports_shared_prompt`` (checked once per model)."""
        if not self.share_prompt or _dist.is_sharded(self.policy):
            return None
        if self._shared_ok.get(id(model)) is None:
            self._shared_ok[id(model)] = supports_shared_prompt(_dist.unwrap(model))
        if not self._shared_ok[id(model)]:
            return None
        return prompt_plan(ro.prompt_ids, ro.prompt_mask)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        opt = self.optimizers()
        g = self.group_size
        prompts = batch["prompt"]
        columns = {k: v for k, v in batch.items() if k != "prompt"}
        t0 = time.perf_counter()
        # Sampling noise is a function of (seed, step, rank) only, so a resumed run repeats exactly.
        torch.manual_seed(_mix(self.seed, self.global_step, self.global_rank))

        # 1. rollout: G samples per prompt, groups contiguous
        ro, texts = self.make_rollout(batch)
        t_gen = time.perf_counter()

        # 2. rewards and 3. advantages
        rewards, per_fn, valid = self.score(prompts, ro, texts, columns, g)  # [N]
        mask = ro.completion_mask.float()  # [N, T]
        if self.mask_truncated:
            mask = mask * (~ro.truncated).float()[:, None]
        adv = self.advantage(rewards, mask, group_size=g, valid=valid, reduce_sum=self._reduce_sum)  # [N, T]

        # 4. old and reference log-probs (no extra pass when exactly on-policy)
        with torch.no_grad():
            old_logp = None if self.on_policy else self.completion_logprobs(self.policy, ro)[0]  # [N, T]
            ref_logp = self.reference_logprobs(ro)

        # 5. ppo_epochs x minibatches of updates; normaliser over the whole rollout batch, all ranks
        n = mask.shape[0]
        normalizer = self._reduce_sum(self.objective.aggregation.count(mask)) / self.num_minibatches
        scale = float(self._world())  # DDP averages gradients over ranks; undo it to sum
        gen = torch.Generator().manual_seed(_mix(self.seed, self.global_step, 0))
        acc = _MetricAccumulator()
        with_entropy = self.log_entropy or self.objective.entropy_coef != 0
        keep_ratios = self.log_samples_every > 0 and self.global_step % self.log_samples_every == 0
        micro = int(self.micro_batch_size or n)
        for _epoch in range(self.ppo_epochs):
            for mb, passes in self._minibatches(n, micro, gen):
                opt.zero_grad(set_to_none=True)
                order = _by_length(mb.to(self.device), ro, micro, g if self.share_prompt else 1)
                chunks = list(order.split(micro)) if len(mb) else []
                for _ in range(passes - len(chunks)):  # fewer rows here than on another rank
                    self._idle_pass(ro)
                for idx in chunks:
                    sub = ro.select(idx)
                    logp, ent = self.completion_logprobs(self.policy, sub, with_entropy=with_entropy)
                    old = logp.detach() if old_logp is None else old_logp[idx]
                    loss, metrics = self.objective(logp, old, adv[idx], mask[idx],
                                                   ref_logp=None if ref_logp is None else ref_logp[idx],
                                                   entropy=ent if self.objective.entropy_coef != 0 else (None if ent is None else ent.detach()),
                                                   normalizer=normalizer)
                    self.manual_backward(loss * scale)
                    acc.add(metrics, tokens=mask[idx].sum(), seqs=(mask[idx].sum(-1) > 0).float().sum())
                    if keep_ratios:
                        acc.ratios.append(torch.exp(logp.detach() - old)[mask[idx] > 0].float().cpu())
                grad_norm = self._clip_and_step(opt)
                acc.add_scalar("grad/norm", grad_norm)
                acc.updates += 1
        # close the rollout: one Lightning optimizer step with no gradients (counts the step)
        opt.zero_grad(set_to_none=True)
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        t_end = time.perf_counter()
        self._log_training(ro, rewards, per_fn, valid, mask, acc, texts, prompts, columns,
                           t_gen - t0, t_end - t_gen, adv=adv)

    def _minibatches(self, n: int, micro: int, gen: torch.Generator) -> list[tuple[Tensor, int]]:
        """This rank's rows of each minibatch and the number of forward/backward passes every rank
        makes for it (the most any rank needs with ``micro`` rows a pass).

        The minibatches are those a single process holding the whole rollout batch would form: one
        permutation of the *global* row index (drawn identically on every rank) is cut into
        ``num_minibatches`` pieces, so the updates do not depend on the number of ranks. Local row
        ``j`` is global prompt ``(j // G) * world + rank`` (the sampler deals prompts round-robin),
        sample ``j % G``. A rank may hold more rows of a minibatch than another; the others then
        make zero-weight passes (``_idle_pass``) so that DDP's and FSDP's collectives line up."""
        m, w, g = self.num_minibatches, self._world(), self.group_size
        if m == 1:
            return [(torch.arange(n), -(-n // micro))]
        total = n * w
        perm = torch.randperm(total, generator=gen)  # [W*n] global rows in update order
        place = torch.empty_like(perm)
        place[perm] = torch.arange(total)  # [W*n] position of each global row in perm
        j = torch.arange(n)
        mine = place[((j // g) * w + self.global_rank) * g + j % g]  # [n] positions of this rank's rows
        order = torch.argsort(mine)
        size = total // m
        owner = (perm // g) % w  # [W*n] rank holding each row of perm
        out = []
        for k in range(m):
            rows = order[(mine[order] >= k * size) & (mine[order] < (k + 1) * size)]
            counts = torch.bincount(owner[k * size:(k + 1) * size], minlength=w)  # [W] rows per rank
            out.append((rows, int((-(-counts // micro)).max())))
        return out

    def _idle_pass(self, ro: Rollout) -> None:
        """A forward/backward of one row with zero weight (adds exactly zero gradient), so that this
        rank joins the collectives of a pass it has no rows for."""
        logp, _ = self.completion_logprobs(self.policy, ro.select(torch.zeros(1, dtype=torch.long, device=self.device)))
        self.manual_backward(logp.sum() * 0.0)

    def _clip_and_step(self, opt: Any) -> Tensor:
        """Clip and apply one update; a non-finite gradient skips it (weights and optimizer state
        untouched) and is counted. ``max_consecutive_skips`` in a row stop the run. The norm is over
        all ranks' gradients (FSDP: all shards), and the skip decision is the same on every rank."""
        max_norm = float("inf") if self.max_grad_norm is None else float(self.max_grad_norm)
        norm = _dist.clip_grad_norm(self.policy, max_norm, device=self.device)
        finite = bool(torch.isfinite(norm))
        if self._world() > 1:  # any rank non-finite -> all skip
            finite = not bool(self._reduce_max(torch.tensor(0.0 if finite else 1.0, device=self.device)))
        if finite:
            opt.optimizer.step()
            self._consecutive_skips = 0
        else:
            opt.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{self._consecutive_skips} consecutive updates had a non-finite loss or gradient "
                    f"(at rollout step {self.global_step}); the weights were left untouched. Lower the learning "
                    "rate or check the rewards; resume from the last checkpoint (max_consecutive_skips sets the limit)")
        return norm.detach()

    # ----------------------------------------------------------------------------- logging
    def _log_training(self, ro: Rollout, rewards: Tensor, per_fn: dict[str, Tensor], valid: Tensor, mask: Tensor,
                      acc: "_MetricAccumulator", texts: list[str], prompts: list[str],
                      columns: Mapping[str, list[Any]], t_gen: float, t_upd: float,
                      adv: Tensor | None = None) -> None:
        # Every scalar is over the whole rollout batch of all ranks: sums and counts are all-reduced.
        g = self.group_size
        lens = ro.completion_mask.sum(-1).float()  # [N]
        grp_std = rewards.view(-1, g).std(-1)  # [B]
        sums = {
            "reward/mean": (rewards.sum(), rewards.numel()),
            "reward/sq": ((rewards ** 2).sum(), rewards.numel()),
            "reward/zero_std_groups": ((grp_std < 1e-8).float().sum(), grp_std.numel()),
            "reward/invalid": ((~valid).float().sum(), valid.numel()),
            "completion/length_mean": (lens.sum(), lens.numel()),
            "completion/truncated": (ro.truncated.float().sum(), lens.numel()),
        }
        for k, v in per_fn.items():
            sums[f"reward/{k}"] = (v.sum(), v.numel())
        if self.accuracy_fn is not None:
            a = torch.tensor(self.accuracy_fn(_repeat(prompts, g), texts, **{k: _repeat(v, g) for k, v in columns.items()}),
                             dtype=torch.float32)
            sums["accuracy/train"] = (a.sum().to(self.device), a.numel())
        if adv is not None:  # over the whole batch (the objective's per-minibatch std is not additive)
            a_m = adv * mask
            sums["advantage/mean"] = (a_m.sum(), mask.sum())
            sums["advantage/sq"] = ((a_m * adv).sum(), mask.sum())
        out = acc.compute(self._reduce_sum)
        keys = list(sums)
        packed = torch.stack([torch.as_tensor(s, dtype=torch.float32, device=self.device) for s, _ in sums.values()]
                             + [torch.tensor(float(c), device=self.device) for _, c in sums.values()])
        packed = self._reduce_sum(packed)
        vals = packed[: len(keys)] / packed[len(keys):].clamp(min=1)
        for k, v in zip(keys, vals):
            out[k] = v
        out["reward/std"] = (out.pop("reward/sq") - out["reward/mean"] ** 2).clamp(min=0).sqrt()
        if adv is not None:
            out["advantage/std"] = (out.pop("advantage/sq") - out["advantage/mean"] ** 2).clamp(min=0).sqrt()
        t_gen, t_upd = self._reduce_max(torch.tensor([t_gen, t_upd], device=self.device)).tolist()  # slowest rank
        out["completion/length_max"] = self._reduce_max(lens.max())
        total_tok = self._reduce_sum(lens.sum())
        n_all = float(lens.numel() * self._world())
        out["perf/samples_per_s"] = torch.tensor(n_all / max(t_gen + t_upd, 1e-9))
        out["perf/tokens_per_s"] = total_tok / max(t_gen + t_upd, 1e-9)
        out["perf/rollout_s"] = torch.tensor(t_gen)
        out["perf/update_s"] = torch.tensor(t_upd)
        out["lr"] = torch.tensor(self.optimizers().optimizer.param_groups[0]["lr"])
        out["train/skipped_updates"] = torch.tensor(float(self.skipped_updates))
        keys = list(out)
        on_dev = [k for k in keys if torch.is_tensor(out[k]) and out[k].device.type != "cpu"]
        got = dict(zip(on_dev, torch.stack([out[k].float().reshape(()) for k in on_dev]).tolist())) if on_dev else {}
        scalars = {k: got[k] if k in got else float(out[k]) for k in keys}  # one device sync for all of them
        self.history.append(scalars)
        # Lightning's self.log costs ~0.25 ms a key: hand it the scalars only on the steps its loggers write
        # (trainer.log_every_n_steps; configs/trainer sets 1); the history above keeps every step's values.
        if _should_update_logs(self.trainer):
            self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=len(prompts))
        self.log("reward", scalars["reward/mean"], prog_bar=True, logger=False, on_step=True, batch_size=len(prompts))
        # this rollout's index: opt.step() above already advanced global_step; Lightning logs the
        # scalars at this index too, and keep_ratios (training_step) used the same condition
        step = self.global_step - 1
        if self.log_samples_every > 0 and step % self.log_samples_every == 0 and self.global_rank == 0:
            tb = _tensorboard(self)
            if tb is not None:
                if acc.ratios:
                    tb.add_histogram("ratio/token_hist", torch.cat(acc.ratios), step)
                rows = [f"| {p!r} | {t!r} | {r:.3f} |" for p, t, r in
                        zip(_repeat(prompts, g)[:8], texts[:8], rewards[:8].tolist())]
                tb.add_text("samples", "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(rows), step)

    def _reduce_max(self, t: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        # Validation must not consume the training random stream (exact resume).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(_mix(self.seed, self.global_step, 1_000 + batch_idx))
            self._validate(batch)

    def _validate(self, batch: dict[str, list[Any]]) -> None:
        prompts = batch["prompt"]
        columns = {k: v for k, v in batch.items() if k != "prompt"}
        for mode in ("greedy", "sampled"):
            ro = self.sample(prompts, 1, greedy=mode == "greedy")
            texts = self.decode(ro)
            rewards, _, _ = self.score(prompts, ro, texts, columns, 1)
            self.val_metrics[f"reward_{mode}"].update(rewards)
            if self.accuracy_fn is not None:
                a = torch.tensor(self.accuracy_fn(prompts, texts, **columns), dtype=torch.float32, device=self.device)
                self.val_metrics[f"accuracy_{mode}"].update(a)
        for k, m in self.val_metrics.items():
            if k.startswith("reward") or self.accuracy_fn is not None:
                self.log(f"val/{k}", m, on_step=False, on_epoch=True, batch_size=len(prompts))

    # ----------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlopt"] = {"skipped_updates": self.skipped_updates, "history": list(self.history)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rlopt", {})
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.history = list(state.get("history", []))

    def on_train_start(self) -> None:
        self.policy.train()  # from_pretrained returns eval mode; the reference copy stays in eval

    def on_fit_start(self) -> None:
        """Check every prompt fits the context with the generation budget, before any work."""
        dm = getattr(self.trainer, "datamodule", None)
        limit = getattr(getattr(self.policy, "config", None), "max_position_embeddings", None)
        if dm is None or limit is None:
            return
        for split in ("train_rows", "val_rows"):
            rows = getattr(dm, split, None) or []
            if not rows:
                continue
            lens = [len(x) for x in self.tokenizer([r["prompt"] for r in rows])["input_ids"]]
            i = max(range(len(lens)), key=lens.__getitem__)
            if lens[i] + self.rollout.max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} of the {split.split('_')[0]} set is {lens[i]} tokens; with rollout.max_new_tokens="
                    f"{self.rollout.max_new_tokens} it exceeds the model's context of {limit} tokens "
                    f"(prompt: {rows[i]['prompt'][:80]!r}...). Shorten the prompts or lower rollout.max_new_tokens")

    def reference_logprobs(self, ro: Rollout) -> Tensor | None:
        """Log-probs ``[N, T]`` under the reference policy, or None when there is no KL term."""
        if self.ref_via_adapter:
            with self.policy.disable_adapter():
                return self.completion_logprobs(self.policy, ro)[0]
        return self.completion_logprobs(self.ref_policy, ro)[0] if self.ref_policy is not None else None

    # ----------------------------------------------------------------------------- export
    def export(self, path: str) -> str:
        """Save the policy and tokenizer with ``save_pretrained`` (transformers can reload them).

        Sharded (FSDP / FSDP2): every rank must call it; the full weights are gathered to rank 0's CPU
        and rank 0 writes them. Unsharded: only global rank 0 writes (other ranks return at once)."""
        state = _dist.full_state_dict(self.policy)  # collective when sharded, else None
        if _dist.is_global_zero():
            kwargs = {} if state is None else {"state_dict": state}
            model = _dist.unwrap(self.policy)
            if is_peft(model):  # export the merged weights: a plain transformers model
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(path, **kwargs)
            self.tokenizer.save_pretrained(path)
        if state is not None and dist.is_initialized():
            dist.barrier()  # the folder is complete when any rank returns
        return path


def _repeat(xs: list[Any], k: int) -> list[Any]:
    """Each item ``k`` times in a row: per-prompt columns aligned with contiguous groups."""
    return [x for x in xs for _ in range(k)]


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient."""


def _trim_padding(ro: Rollout) -> Rollout:
    """``ro`` without the columns that are padding in every row: the left-padding columns before
    the longest prompt and the completion columns after the longest completion."""
    lead = int((ro.prompt_mask.sum(0) == 0).long().cumprod(0).sum())  # all-pad prompt columns
    used = ro.completion_mask.sum(0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1  # completion columns any row uses
    if lead == 0 and width == ro.completion_ids.shape[1]:
        return ro
    return dataclasses.replace(ro, prompt_ids=ro.prompt_ids[:, lead:], prompt_mask=ro.prompt_mask[:, lead:],
                               completion_ids=ro.completion_ids[:, :width],
                               completion_mask=ro.completion_mask[:, :width])


def _by_length(rows: Tensor, ro: Rollout, micro: int, group_size: int = 1) -> Tensor:
    """With gradient accumulation (micro-batches smaller than the minibatch), order the rows by
    length so that each micro-batch holds similar lengths and ``_trim_padding`` drops more
    columns. With ``group_size`` G > 1 the rows of a group (rollout rows ``j // G``, one prompt)
    stay together, ordered by the group's total length, so that a micro-batch holds whole groups
    and the shared-prompt forward runs each prompt once. The accumulated gradient is the same
    sum, in another order."""
    if micro >= rows.numel():
        return rows
    lengths = ro.prompt_mask[rows].sum(-1) + ro.completion_mask[rows].sum(-1)  # [n]
    order = torch.sort(lengths, stable=True).indices
    if group_size > 1:
        gid = rows // group_size  # [n]
        order = order[torch.sort(gid[order], stable=True).indices]  # groups contiguous, by length inside
        total = torch.zeros(int(gid.max()) + 1, dtype=lengths.dtype, device=lengths.device).index_add_(0, gid, lengths)
        order = order[torch.sort(total[gid[order]], stable=True).indices]  # groups by total length
    return rows[order]


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _MetricAccumulator:
    """Token-/sequence-weighted means of the objective's metrics over all minibatch updates, and of
    all ranks' rows. The ``loss/*`` values are additive (each micro-batch's share of its update's
    loss, under the global normaliser): they are summed over micro-batches and ranks and averaged
    over the ``updates``."""

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

    def compute(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        s = torch.stack([torch.as_tensor(self.sums[k]).float().reshape(()) for k in keys])
        w = torch.stack([torch.as_tensor(self.weights[k]).float().reshape(()).to(s.device) for k in keys])
        s, w = reduce_sum(s), reduce_sum(w)
        out = {k: v / max(self.updates, 1) if k.startswith("loss/") else v / wk.clamp(min=1e-12)
               for k, v, wk in zip(keys, s, w)}
        for store, op in ((self.mins, dist.ReduceOp.MIN), (self.maxs, dist.ReduceOp.MAX)):
            for k, v in store.items():
                if dist.is_available() and dist.is_initialized():
                    v = v.clone()
                    dist.all_reduce(v, op=op)
                out[k] = v
        return out


def _should_update_logs(trainer: Any) -> bool:
    """Whether Lightning's loggers write this step's scalars: Lightning's own test (every
    ``log_every_n_steps``-th step, or a step after which ``should_stop`` is already set). With
    ``log_every_n_steps`` > 1, ``trainer.callback_metrics`` (what ``ModelCheckpoint`` /
    ``EarlyStopping`` monitors read) therefore holds the last *logged* step's training scalars,
    and a step stopped by a callback during that step (preemption) is not written; validation
    metrics are unaffected and ``module.history`` holds every step."""
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own test, in the same loop state
    return bool(getattr(connector, "should_update_logs", True)) or bool(getattr(trainer, "fast_dev_run", False))


def _tensorboard(module: L.LightningModule) -> Any:
    for lg in module.loggers:
        exp = getattr(lg, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram"):
            return exp
    return None


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token "
                             "(e.g. model.pad_token='<pad>' after adding it) before training")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
