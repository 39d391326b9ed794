"""DAPO dynamic sampling (rlopt/rollout/dynamic.py) on scripted rewards, and the record helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlopt.ranks import minibatch_plan
from rlopt.rollout import Completions
from rlopt.rollout.dynamic import DynamicSampling, concat_completions

G = 2


def _module(rewards_by_prompt: dict[str, list[float]], width_by_chunk: list[int]):
    """A stand-in for the module: prompt p's G completions get rewards_by_prompt[p]; the k-th
    generation call pads its completions to width_by_chunk[k] (so chunks differ in width)."""
    calls = []

    def make_completions(chunk):
        k = len(calls)
        calls.append(list(chunk["prompt"]))
        n, t = len(chunk["prompt"]) * G, width_by_chunk[k]
        ids = torch.arange(n * t).view(n, t) + 100 * k
        ro = Completions(torch.ones(n, 1 + k, dtype=torch.long), torch.ones(n, 1 + k, dtype=torch.long), ids,
                         torch.ones(n, t, dtype=torch.long), torch.zeros(n, dtype=torch.bool), -torch.ones(n, t))
        return ro, [f"{p}#{j}" for p in chunk["prompt"] for j in range(G)]

    def score(prompts, ro, texts, columns, g):
        r = torch.tensor([v for p in prompts for v in rewards_by_prompt[p]])
        return r, {"fn": r.clone()}, torch.ones_like(r, dtype=torch.bool)

    tok = SimpleNamespace(pad_token_id=0)
    return SimpleNamespace(group_size=G, make_completions=make_completions, score=score, tokenizer=tok,
                           device=torch.device("cpu"), global_step=7), calls


REWARDS = {"a": [1.0, 1.0], "b": [0.0, 1.0], "c": [0.5, 0.5], "d": [0.2, 0.9], "e": [0.0, 0.3], "f": [1.0, 0.0]}


def test_drops_equal_reward_groups_and_fills_the_batch_from_more_prompts():
    module, calls = _module(REWARDS, [3, 5, 2])
    dyn = DynamicSampling(batch_size=2, max_gen_batches=3)
    batch = {"prompt": list("abcdef"), "answer": list("ABCDEF")}
    prompts, columns, ro, texts, rewards, per_fn, valid, m = dyn.collect(module, batch)
    # chunk 1 (a, b): a has equal rewards -> b kept; chunk 2 (c, d): c dropped, d kept -> full, chunk 3 unused
    assert calls == [["a", "b"], ["c", "d"]] and prompts == ["b", "d"] and columns == {"answer": ["B", "D"]}
    assert texts == ["b#0", "b#1", "d#0", "d#1"] and rewards.tolist() == pytest.approx([0.0, 1.0, 0.2, 0.9])
    assert ro.completion_ids.shape == (4, 5) and ro.prompt_ids.shape == (4, 2)  # widths of the widest chunk
    assert ro.completion_mask[:2, 3:].sum() == 0 and (ro.sampler_logp[:2, 3:] == 0).all()  # chunk 1 right-padded
    assert ro.prompt_mask[:2, 0].sum() == 0  # chunk 1's prompts left-padded
    assert m["sampling/pass_rate"] == pytest.approx(2 / 4) and m["reward/zero_std_groups"] == pytest.approx(2 / 4)
    assert m["sampling/gen_batches"] == 2 and m["sampling/short_steps"] == 0


def test_exhausted_prompts_train_on_what_there_is_or_stop_with_the_step_named():
    rewards = {**REWARDS, "b": [1.0, 1.0], "d": [0.3, 0.3], "e": [0.0, 0.0]}  # only f passes
    module, _ = _module(rewards, [3, 3, 3])
    dyn = DynamicSampling(batch_size=2, max_gen_batches=3, on_exhausted="train")
    prompts, *_, m = dyn.collect(module, {"prompt": list("abcdef")})
    assert prompts == ["f"] and dyn.short_steps == 1 and m["sampling/short_steps"] == 1
    assert m["sampling/pass_rate"] == pytest.approx(1 / 6)
    module, _ = _module(rewards, [3, 3, 3])
    with pytest.raises(RuntimeError, match="step 7.*only 1 of 2 groups.*max_gen_batches=3"):
        DynamicSampling(batch_size=2, max_gen_batches=3, on_exhausted="error").collect(module, {"prompt": list("abcdef")})


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="on_exhausted"):
        DynamicSampling(2, on_exhausted="retry")
    with pytest.raises(ValueError, match="max_gen_batches"):
        DynamicSampling(2, max_gen_batches=0)


def test_concat_keeps_one_record_as_is_and_greedy_parts_have_no_sampler_logp():
    a = Completions(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1), torch.ones(2, 2, dtype=torch.long),
                    torch.ones(2, 2), torch.zeros(2, dtype=torch.bool))
    assert concat_completions([a], 0) is a
    assert concat_completions([a, a], 0).sampler_logp is None


def test_minibatches_cover_every_row_when_they_do_not_divide_the_batch():
    for whole in (False, True):
        plan = minibatch_plan(10, 10, torch.Generator().manual_seed(0), 4, 2, whole_groups=whole)
        rows = sorted(int(r) for mb, _ in plan for r in mb)
        assert rows == list(range(10)) and len(plan) == 4
