"""PolicyOptModule: a LightningModule that trains a causal LM with any composed algorithm.

    advantage, objective = build_preset("gspo")
    module = PolicyOptModule(policy, tokenizer, advantage, objective,
                             rewards=RewardSet({"match": partial_match}), group_size=4,
                             ppo_epochs=1, num_minibatches=4)
    L.Trainer(max_steps=200).fit(module, datamodule=dm)

One training step is one rollout step, in two phases that read top to bottom:

- ``collect(batch) -> Trajectory``: generate G completions per prompt (the rollout engine),
  score them (rewards), compute advantages, then the old and reference log-probs;
- ``update(traj)``: ``ppo_epochs`` x ``num_minibatches`` optimizer updates with gradient
  clipping, the loss normalised by a count over the whole rollout batch on all ranks.

``trainer.global_step`` counts rollout steps: the updates are taken on the wrapped torch
optimizer and one Lightning optimizer step (with no gradients, a no-op) closes the rollout step.
Metric assembly and logging live in metrics.py, log-prob forwards in logprobs/, rank helpers in
ranks.py, sharding in distributed.py, the guarded optimizer step in guard.py.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from . import distributed as _dist
from . import ranks
from .algorithms import AdvantageEstimator, PolicyObjective
from .algorithms.mismatch import finish_mismatch, mismatch_stats
from .algorithms.registry import check_range
from .algorithms.regularisers import mix_reference_
from .conf import check_parts
from .console import ignore_reference_eval_mode_warning
from .data import check_prompts_fit
from .guard import NonFiniteError, UpdateGuard  # noqa: F401 - NonFiniteError: re-exported
from .logprobs import CompletionLogProbs, by_length
from .metrics import MetricAccumulator, log_step, repeat_each, step_scalars, validate
from .models import is_peft, prepare_tokenizer
from .rewards import RewardSet
from .rollout import Completions, HFGenerate, RolloutEngine
from .rollout.pipeline import AsyncRollouts, CloseWorker
from .rollout.staleness import BehaviourWeights
from .trajectory import Trajectory

# the parts whose state carries across rollout steps: saved in checkpoints under their names
STATEFUL = ("guard", "behaviour", "pipeline", "advantage", "entropy_controller", "dynamic_sampling")


class PolicyOptModule(L.LightningModule):
    """Trains ``policy`` with ``advantage`` x ``objective`` on prompts from a ``PromptDataModule``.

    Args:
        policy: a causal LM (transformers ``PreTrainedModel``, optionally PEFT-wrapped).
        tokenizer: its tokenizer; padding is set to the left, pad = EOS when it has no pad token.
        advantage: an ``AdvantageEstimator`` (rlopt.algorithms), called on the rewards.
        objective: a ``PolicyObjective`` (ratio x clip x aggregation, KL and entropy terms).
        rewards: a ``RewardSet`` of named reward functions and their weights.
        optimizer: ``params -> torch.optim.Optimizer`` (default AdamW, lr 1e-5).
        scheduler: ``optimizer -> LR scheduler`` stepped once per rollout step, or None.
        rollout: the rollout engine (default ``HFGenerate()``); its temperature is also used for
            the training log-probs.
        group_size: G completions per prompt (contiguous rows).
        ppo_epochs: passes over each rollout batch.
        num_minibatches: optimizer updates per pass (> 1 makes later updates off-policy).
        micro_batch_size: rows per forward/backward inside a minibatch (gradient accumulation);
            None = the whole minibatch.
        max_grad_norm: gradient-norm clip per update (None: no clipping, the norm is still logged).
        accuracy_fn: ``(prompts, completions, **columns) -> list[float]`` for the accuracy metrics.
        log_samples_every: every k steps, write sample tables and ratio histograms to TensorBoard.
        log_entropy: compute and log the per-token entropy (a softmax over the vocabulary per update).
        max_consecutive_skips: this many non-finite updates in a row stop the run.
        seed: the seed of the sampling noise, drawn from ``(seed, step, rank)`` every step.
        logprobs: a ``CompletionLogProbs`` (logprobs/: the shared-prompt forward, packed or through
            the KV cache, and the chunked LM head); None: the defaults. Its temperature must be
            the rollout engine's.
        entropy_controller: an ``AdaptiveEntropyCoef`` (Skywork-OR1) that sets ``objective.entropy_coef``
            after every rollout step from the step's mean token entropy; None keeps it constant.
        ref_sync_every: every k rollout steps mix the policy into the reference model,
            ``ref = alpha * policy + (1 - alpha) * ref`` (TRL's ``sync_ref_model``); 0 = never.
        ref_sync_alpha: that alpha.
        staleness: sample each rollout batch with the weights of this many optimizer updates ago
            (``offpolicy.staleness``; rollout/staleness.py); 0 = the current weights.
        dynamic_sampling: a ``DynamicSampling`` (DAPO; rollout/dynamic.py) that drops groups whose
            rewards all agree and samples more prompts of the step's batch until it is full.
        async_rollouts: an ``AsyncRollouts`` (``offpolicy.async``; rollout/pipeline.py): a worker
            process samples the next batch while this one updates; None samples in this process.
    """

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
        accuracy_fn: Callable[..., list[float]] | None = None,
        log_samples_every: int = 50,
        log_entropy: bool = True,
        max_consecutive_skips: int = 5,
        seed: int = 0,
        logprobs: CompletionLogProbs | None = None,
        entropy_controller: Any = None,
        ref_sync_every: int = 0,
        ref_sync_alpha: float = 0.6,
        staleness: int = 0,
        dynamic_sampling: Any = None,
        async_rollouts: AsyncRollouts | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = prepare_tokenizer(tokenizer)
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
        self.accuracy_fn = accuracy_fn
        self.log_samples_every = int(log_samples_every)
        self.log_entropy = bool(log_entropy)
        self.guard = UpdateGuard(max_grad_norm, max_consecutive_skips)  # clip; skip non-finite updates (guard.py)
        self.seed = int(seed)
        self.logprobs = logprobs or CompletionLogProbs(self.rollout.temperature)
        if self.logprobs.temperature != float(self.rollout.temperature):
            raise ValueError(f"logprobs.temperature {self.logprobs.temperature} differs from the rollout engine's "
                             f"{self.rollout.temperature}: the update's log-probs must be the sampling distribution's")
        check_parts(advantage, objective, self.group_size, micro_batch_size, self.ppo_epochs, self.num_minibatches)
        # A reference policy exists only when the KL term is active (a frozen copy of the start).
        self.ref_policy = None
        self.history: list[dict[str, float]] = []  # every step's logged scalars (kept in checkpoints)
        self.behaviour = BehaviourWeights(self.rollout.dtype, staleness)  # the weights that sample (not a submodule)
        # With LoRA the reference is the base model with the adapter disabled: no second copy.
        needs_ref = objective.needs_reference or "kl" in advantage.needs  # KL loss, or KL folded into the reward
        self.ref_via_adapter = needs_ref and is_peft(policy)
        if needs_ref and not self.ref_via_adapter:
            self.ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
        self.entropy_controller = entropy_controller
        if entropy_controller is not None and not self.log_entropy:
            raise ValueError("the adaptive entropy coefficient needs the token entropy: set log_entropy: true")
        self.dynamic_sampling = dynamic_sampling
        self.pipeline = async_rollouts
        if async_rollouts is not None and (staleness or dynamic_sampling is not None):
            raise ValueError("offpolicy.async=true cannot be combined with offpolicy.staleness > 0 (the pipeline's lag "
                             "is the staleness) or dynamic_sampling.enabled=true")
        self.whole_groups = bool(getattr(objective.aggregation, "requires_whole_groups", False))
        self.ref_sync_every = int(ref_sync_every)
        self.ref_sync_alpha = float(check_range("kl.ref_sync_alpha", ref_sync_alpha, low=0.0, high=1.0))
        if self.ref_sync_every and self.ref_policy is None:
            raise ValueError("kl.ref_sync_every > 0 needs a separate reference model (a KL term, and no LoRA adapter)")
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in (
            "reward_greedy", "reward_sampled", "accuracy_greedy", "accuracy_sampled")})
        self.save_hyperparameters(ignore=["policy", "tokenizer", "advantage", "objective", "rewards",
                                          "optimizer", "scheduler", "rollout", "accuracy_fn", "entropy_controller",
                                          "async_rollouts", "logprobs"])

    # ----------------------------------------------------------------------------- set-up
    @property
    def skipped_updates(self) -> int:
        return self.guard.skipped

    @property
    def reward_history(self) -> list[float]:
        return [h["reward/mean"] for h in self.history]

    @property
    def on_policy(self) -> bool:
        """One update per rollout: pi_old is the policy being updated, so its log-probs are the
        update's own (ratio 1); the sampler mu may still differ (stale weights, another dtype)."""
        return self.ppo_epochs == 1 and self.num_minibatches == 1

    def configure_model(self) -> None:
        """FSDP / FSDP2: shard the policy and the frozen reference per decoder block (rlopt.distributed);
        a no-op under any other strategy. Runs before ``configure_optimizers``. The rollout worker's
        copy of the policy is taken first (it samples with whole weights, gathered every step)."""
        if self.pipeline is not None:
            self.pipeline.prepare(self.policy)
        _dist.configure_sharding(self)

    def configure_callbacks(self) -> list[L.Callback]:
        return [CloseWorker(self.pipeline)] if self.pipeline is not None else []  # no worker outlives fit

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ----------------------------------------------------------------------------- pieces
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def sample(self, prompts: list[str], num_samples: int, greedy: bool = False, behaviour: bool = False
               ) -> Completions:
        """Sample with the policy; ``behaviour=True`` (training rollouts) with the behaviour copy when
        ``rollout.dtype`` asks for one (validation always samples the policy itself)."""
        ids, mask = self.encode_prompts(prompts)
        # sharded weights: every decoding step is a collective, so ranks step together until all are done
        synced = {"synced_gpus": True} if _dist.synced_generation(self.policy) else {}
        with _dist.generation_model(self.policy) as model:
            if behaviour:
                if self.behaviour.separate and _dist.is_sharded(self.policy):
                    raise ValueError("rollout.dtype / offpolicy.staleness need unsharded weights (FSDP shards them)")
                model = self.behaviour.model_for(model)
            return self.rollout.generate(model, ids, mask, num_samples, eos_token_id=self.tokenizer.eos_token_id,
                                         pad_token_id=self.tokenizer.pad_token_id, greedy=greedy, **synced)

    def make_completions(self, batch: dict[str, list[Any]]) -> tuple[Completions, list[str]]:
        """``group_size`` samples per prompt (groups contiguous) and their texts. A seam: override it
        to train on given completions (tests feed a fixed batch)."""
        if self.pipeline is not None:  # sampled by the worker during the previous step, with its weights
            ro, self.behaviour.sampled_version = self.pipeline.completions(
                self.global_step, batch["prompt"], self.pipeline.flat_weights(self.policy), self.behaviour.version)
            return ro.to(self.device), self.decode(ro)
        ro = self.sample(batch["prompt"], self.group_size, behaviour=True)
        return ro, self.decode(ro)

    def decode(self, ro: Completions) -> list[str]:
        return self.tokenizer.batch_decode(ro.completion_ids.tolist(), skip_special_tokens=True)

    def score(self, prompts: list[str], ro: Completions, texts: list[str], columns: Mapping[str, list[Any]],
              repeat: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Total reward ``[N]``, each reward function's values ``{name: [N]}`` and validity ``[N]``."""
        cols = {k: repeat_each(v, repeat) for k, v in columns.items()}
        lengths = ro.completion_mask.sum(-1).tolist()
        total, per_fn, valid = self.rewards(repeat_each(prompts, repeat), texts, completion_lengths=lengths, **cols)
        return total.to(self.device), {k: v.to(self.device) for k, v in per_fn.items()}, valid.to(self.device)

    def completion_logprobs(self, model: torch.nn.Module, ro: Completions, with_entropy: bool = False
                            ) -> tuple[Tensor, Tensor | None]:
        """Log-probs ``[n, T]`` (and entropy) of the completion tokens under ``model`` (logprobs/)."""
        return self.logprobs(model, ro, with_entropy=with_entropy, sharded=_dist.is_sharded(self.policy))

    def reference_logprobs(self, ro: Completions) -> Tensor | None:
        """Log-probs ``[N, T]`` under the reference policy, or None when there is no KL term."""
        if self.ref_via_adapter:
            with self.policy.disable_adapter():
                return self.completion_logprobs(self.policy, ro)[0]
        return self.completion_logprobs(self.ref_policy, ro)[0] if self.ref_policy is not None else None

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        # Sampling noise is a function of (seed, step, rank) only, so a resumed run repeats exactly.
        t0 = time.perf_counter()
        torch.manual_seed(ranks.mix_seed(self.seed, self.global_step, self.global_rank))
        traj = self.collect(batch)
        acc = self.update(traj)
        # close the rollout step: one Lightning optimizer step with no gradients (counts the step)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        traj.timings["update"] = time.perf_counter() - t0 - traj.timings["rollout"]
        scalars = step_scalars(self, traj, acc)
        self._regularise(scalars)
        log_step(self, traj, scalars, acc)

    def _regularise(self, scalars: dict[str, float]) -> None:
        """After a rollout step: the adaptive entropy coefficient reads the step's mean entropy (all
        ranks); the reference model takes ``alpha`` of the policy every ``ref_sync_every`` steps."""
        if self.entropy_controller is not None:
            coef = float(self.entropy_controller.step(scalars["entropy/mean"]))
            self.objective.entropy_coef = scalars["entropy/coef"] = coef
        if self.ref_sync_every and self.global_step % self.ref_sync_every == 0:
            mix_reference_(self.ref_policy.parameters(), self.policy.parameters(), self.ref_sync_alpha)

    def collect(self, batch: dict[str, list[Any]]) -> Trajectory:
        """Phase 1: generate -> rewards -> advantages -> old and reference log-probs -> behaviour
        correction and token masks (once per rollout, on the whole batch)."""
        t0 = time.perf_counter()
        dyn: dict[str, Tensor] = {}
        if self.dynamic_sampling is not None:  # sample and score chunks of prompts until the batch is full
            prompts, columns, ro, texts, rewards, per_fn, valid, dyn = self.dynamic_sampling.collect(self, batch)
            t_gen = time.perf_counter() - t0
        else:
            prompts = batch["prompt"]
            columns = {k: v for k, v in batch.items() if k != "prompt"}
            ro, texts = self.make_completions(batch)  # G samples per prompt, groups contiguous
            t_gen = time.perf_counter() - t0
            rewards, per_fn, valid = self.score(prompts, ro, texts, columns, self.group_size)  # [N]
        mask = ro.completion_mask.float()  # [N, T]
        obj, mu, needs = self.objective, ro.sampler_logp, self.advantage.needs  # mu: [N, T] | None
        if obj.needs_sampler_logp and mu is None:
            raise ValueError(f"the {obj.correction.registered_name!r} correction / masks need the sampler's log-probs, "
                             f"but rollout engine {type(self.rollout).__name__} returned none")
        old_ent = None
        with torch.no_grad():  # no old-log-prob pass when exactly on-policy (the update's own values) unless needed
            if not self.on_policy or obj.needs_old_logp_pass or "kl" in needs:
                old_logp, old_ent = self.completion_logprobs(self.policy, ro, with_entropy=obj.needs_rollout_entropy)
            else:
                old_logp = None  # [N, T] | None
            ref_logp = self.reference_logprobs(ro)  # [N, T] | None
        extra: dict[str, Any] = {}
        if "kl" in needs:  # KL folded into the reward (REINFORCE++): k1 of the sampling policy to the reference
            extra["kl"] = (old_logp - ref_logp) * mask  # [N, T]
        if "reward_components" in needs:  # multi-reward normalisation (GDPO)
            extra["reward_components"], extra["reward_weights"] = per_fn, dict(self.rewards.weights)
        adv = self.advantage(rewards, mask, group_size=self.group_size, valid=valid,
                             reduce_sum=ranks.reduce_sum, **extra)  # [N, T]
        traj = Trajectory(prompts=prompts, columns=columns, completions=ro, texts=texts, rewards=rewards,
                          reward_components=per_fn, valid=valid, loss_mask=mask, advantages=adv,
                          old_logp=old_logp, ref_logp=ref_logp, sampler_logp=mu, timings={"rollout": t_gen},
                          policy_version=self.behaviour.sampled_version,
                          staleness=self.behaviour.version - self.behaviour.sampled_version)
        traj.rollout_metrics.update(dyn)
        if self.pipeline is not None:
            traj.rollout_metrics["perf/worker_sample_s"] = torch.tensor(self.pipeline.gen_seconds)
        if obj.has_rollout_weights:
            rw = obj.rollout_weights(mask, old_logp=old_logp, sampler_logp=mu, advantages=adv, entropy=old_ent,
                                     truncated=ro.truncated, gather=ranks.gather_cat)
            traj.loss_mask, traj.behaviour_weight, traj.rollout_metrics = rw.mask, rw.weight, dict(rw.metrics)
        if mu is not None and old_logp is not None and not obj.correction.replaces_old_logp:
            traj.rollout_metrics.update(finish_mismatch(mismatch_stats(old_logp, mu, mask), ranks.reduce_sum,
                                                        ranks.reduce_max))
        return traj

    def update(self, traj: Trajectory) -> MetricAccumulator:
        """Phase 2: ``ppo_epochs`` x ``num_minibatches`` optimizer updates on the trajectory. The loss
        normaliser is counted over the whole rollout batch of all ranks, so the minibatch losses
        add up to the one-batch loss whatever the minibatching, accumulation and ranks."""
        opt = self.optimizers()
        ro, mask, adv, old_logp, ref_logp = traj.completions, traj.loss_mask, traj.advantages, traj.old_logp, traj.ref_logp
        mu, bw = traj.sampler_logp, traj.behaviour_weight  # [N, T] | None each
        bypass = self.objective.correction.replaces_old_logp  # pi_old := mu
        seen = torch.zeros_like(mask) if (mu is not None and old_logp is None and not bypass) else None  # on-policy pi_old
        mask_gen = torch.Generator().manual_seed(ranks.mix_seed(self.seed, self.global_step, 2, self.global_rank))  # Clip-Cov
        n, g = traj.num_rows, self.group_size
        normalizer = ranks.reduce_sum(self.objective.aggregation.count(mask)) / self.num_minibatches
        scale = float(ranks.world_size())  # DDP averages gradients over ranks; undo it to sum
        gen = torch.Generator().manual_seed(ranks.mix_seed(self.seed, self.global_step, 0))
        acc = MetricAccumulator()
        with_entropy = self.log_entropy or self.objective.entropy_coef != 0
        keep_ratios = self.log_samples_every > 0 and self.global_step % self.log_samples_every == 0
        micro = int(self.micro_batch_size or n)
        rank, world = ranks.rank_world()
        for _epoch in range(self.ppo_epochs):
            for mb, passes in ranks.minibatch_plan(n, micro, gen, self.num_minibatches, g, rank, world, self.whole_groups):
                opt.zero_grad(set_to_none=True)
                order = by_length(mb.to(self.device), ro, micro, g if self.logprobs.share_prompt or self.whole_groups else 1)
                chunks = list(order.split(micro)) if len(mb) else []
                for _ in range(passes - len(chunks)):  # fewer rows here than on another rank
                    self._idle_pass(ro)
                for idx in chunks:
                    if self.pipeline is not None:
                        self.pipeline.lend_idle_threads()  # offpolicy.borrow_threads: the worker idles
                    logp, ent = self.completion_logprobs(self.policy, ro.select(idx), with_entropy=with_entropy)
                    if old_logp is not None:
                        old = old_logp[idx]  # [n, T]
                    else:  # on-policy: pi_old is this first (and only) update's own log-probs; bypass: mu
                        old = mu[idx] if bypass else logp.detach()
                        if seen is not None:
                            seen[idx] = logp.detach()
                    loss, metrics = self.objective(logp, old, adv[idx], mask[idx],
                                                   ref_logp=None if ref_logp is None else ref_logp[idx],
                                                   entropy=ent if self.objective.entropy_coef != 0 else (None if ent is None else ent.detach()),
                                                   normalizer=normalizer, sampler_logp=None if mu is None else mu[idx],
                                                   behaviour_weight=None if bw is None else bw[idx], generator=mask_gen)
                    self.manual_backward(loss * scale)
                    acc.add(metrics, tokens=mask[idx].sum(), seqs=(mask[idx].sum(-1) > 0).float().sum())
                    if keep_ratios:
                        acc.ratios.append(torch.exp(logp.detach() - old)[mask[idx] > 0].float().cpu())
                norm, applied = self.guard.step(opt.optimizer, self.policy, self.device, self.global_step)
                if applied:
                    self.behaviour.updated(self.policy)
                acc.add_scalar("grad/norm", norm)
                acc.updates += 1
        if seen is not None:  # the sampler against the on-policy pi_old, known only now
            traj.rollout_metrics.update(finish_mismatch(mismatch_stats(seen, mu, traj.completions.completion_mask),
                                                        ranks.reduce_sum, ranks.reduce_max))
        return acc

    def _idle_pass(self, ro: Completions) -> None:
        """A forward/backward of one row with zero weight (adds exactly zero gradient), so that this
        rank joins the collectives of a pass it has no rows for."""
        logp, _ = self.completion_logprobs(self.policy, ro.select(torch.zeros(1, dtype=torch.long, device=self.device)))
        self.manual_backward(logp.sum() * 0.0)

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        # Validation must not consume the training random stream (exact resume).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(ranks.mix_seed(self.seed, self.global_step, 1_000 + batch_idx))
            validate(self, batch)  # greedy and sampled reward and accuracy (metrics.py)

    # ----------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlopt"] = state = {"history": list(self.history)}
        for name in STATEFUL:
            part = getattr(self, name)
            if hasattr(part, "state_dict"):
                state[name] = part.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rlopt", {})
        self.history = list(state.get("history", []))
        state.setdefault("guard", {"skipped_updates": state.get("skipped_updates", 0)})  # checkpoints before guard.py
        for name in STATEFUL:
            part = getattr(self, name)
            if name in state and hasattr(part, "load_state_dict"):
                part.load_state_dict(state[name])
        if self.entropy_controller is not None:
            self.objective.entropy_coef = float(self.entropy_controller.value)

    def on_fit_start(self) -> None:
        """Put the policy in training mode (from_pretrained returns eval mode; the reference copy stays
        in eval) and check every prompt fits the context with the generation budget, before any work."""
        self.policy.train()
        ignore_reference_eval_mode_warning(self)
        self.behaviour.start(self.policy)  # stale sampling: the initial weights are version 0
        limit = getattr(getattr(self.policy, "config", None), "max_position_embeddings", None)
        check_prompts_fit(getattr(self.trainer, "datamodule", None), self.tokenizer, limit, self.rollout.max_new_tokens)
        if self.pipeline is not None:  # the rollout worker, reading batch k ahead from the data module
            last = self.trainer.max_steps - 1 if self.trainer.max_steps and self.trainer.max_steps > 0 else None
            self.pipeline.start(self.policy, self.rollout, self.group_size, self.tokenizer, self.trainer.datamodule,
                                self.encode_prompts, lambda k: ranks.mix_seed(self.seed, k, self.global_rank), last)

    # ----------------------------------------------------------------------------- export
    def export(self, path: str) -> str:
        """Save the policy (LoRA merged) and tokenizer with ``save_pretrained``; under FSDP every rank
        must call it (distributed.export_policy)."""
        return _dist.export_policy(self.policy, self.tokenizer, path)
