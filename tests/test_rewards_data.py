"""Built-in rewards, RewardSet (weights, validation), procedural tasks, FileSource and
PromptDataModule."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from rlopt.data import FileSource, PromptDataModule, TaskSource
from rlopt.rewards import (
    RewardError, RewardSet, exact_match, format_match, numeric_match, overlong_penalty, partial_match,
)
from rlopt.tasks import ArithmeticTask, ReverseTask

from . import conftest as helpers
from .conftest import compose_train

# --- built-in rewards -------------------------------------------------------------------------


def test_exact_match():
    comps = ["cba", " cba\n", "cb", "cbaa", "CBA"]
    assert exact_match(["abc>"] * 5, comps, answer=["cba"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert exact_match(["1+1="], ["2"], answer=[2]) == [1.0]  # non-string answers compare as str


def test_partial_match():
    p = ["abc>"] * 6
    got = partial_match(p, ["cba", "cbx", "cbaa", "c", "", "xyz"], answer=["cba"] * 6)
    # position-wise hits / max(len(completion), len(answer))
    assert got == pytest.approx([1.0, 2 / 3, 3 / 4, 1 / 3, 0.0, 0.0])
    assert partial_match(["x"], [" ab "], answer=["ab"]) == [1.0]  # stripped


def test_numeric_match():
    comps = ["46", "the answer is 46", "46.0", "-3", "4 6", "no number", "46.0000001", "12 then 46"]
    ans = [46, "46", 46, -3, 46, 46, 46, "46"]
    assert numeric_match([""] * 8, comps, answer=ans) == [1, 1, 1, 1, 0, 0, 1, 1]
    assert numeric_match([""], ["46"], answer=["n/a"]) == [0.0]  # unparseable answer: no match, no error
    assert numeric_match([""], ["46.5"], answer=[46], tol=0.6) == [1.0]


def test_format_match():
    comps = ["46", " -46 ", "46a", "", "4 6", "-"]
    assert format_match([""] * 6, comps) == [1, 1, 0, 0, 0, 0]
    assert format_match([""] * 2, ["<a>x</a>", "x"], pattern=r"<a>.*</a>") == [1.0, 0.0]


def test_overlong_penalty_matches_dapo_formula():
    # DAPO eq. 13 with L_max=16, L_cache=4: 0 for |y| <= 12, (12 - |y|)/4 for 12 < |y| <= 16, -1 beyond
    lengths = [0, 5, 12, 13, 14, 15, 16, 17, 100]
    want = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    got = overlong_penalty([""] * 9, [""] * 9, completion_lengths=lengths, max_len=16, cache_len=4)
    assert got == pytest.approx(want)
    # L_max=10, L_cache=10: the whole budget is the soft zone
    assert overlong_penalty([""] * 3, [""] * 3, completion_lengths=[0, 5, 10], max_len=10, cache_len=10) == \
        pytest.approx([0.0, -0.5, -1.0])
    for bad in ({"cache_len": 0}, {"cache_len": 17}):
        with pytest.raises(ValueError, match="cache_len"):
            overlong_penalty([""], [""], completion_lengths=[1], **{"max_len": 16, **bad})


# --- RewardSet ----------------------------------------------------------------------------------

def test_reward_set_weights():
    rs = RewardSet({"a": lambda p, c, **k: [1.0, 2.0], "b": lambda p, c, **k: [10.0, -4.0],
                    "c": lambda p, c, **k: [0.5, 0.5]}, weights={"a": 1.0, "b": 0.5})
    total, per_fn, valid = rs(["p", "q"], ["x", "y"])
    assert total.tolist() == pytest.approx([1 + 5 + 0.5, 2 - 2 + 0.5])  # c: weight 1 by default
    assert set(per_fn) == {"a", "b", "c"} and per_fn["b"].tolist() == [10.0, -4.0]
    assert valid.all() and total.dtype == torch.float32


def test_reward_set_passes_columns_and_lengths():
    seen = {}

    def spy(prompts, completions, answer, completion_lengths, **kwargs):
        seen.update(answer=answer, lengths=completion_lengths, extra=kwargs)
        return [0.0] * len(completions)

    RewardSet({"spy": spy})(["p"], ["c"], answer=["a"], completion_lengths=[3], level=[1])
    assert seen == {"answer": ["a"], "lengths": [3], "extra": {"level": [1]}}


def test_reward_set_rejects_bad_construction():
    with pytest.raises(ValueError, match="at least one"):
        RewardSet({})
    with pytest.raises(ValueError, match="'nope'"):
        RewardSet({"a": exact_match}, weights={"nope": 1.0})
    with pytest.raises(ValueError, match="'a' is not callable"):
        RewardSet({"a": 3})
    with pytest.raises(ValueError, match="nan_policy"):
        RewardSet({"a": exact_match}, nan_policy="ignore")


@pytest.mark.parametrize("fn,words", [
    (helpers.reward_wrong_length, ["returned 3 values for 2 completions"]),
    (helpers.reward_nan, ["returned nan for sample 0", "nan_policy"]),
    (helpers.reward_raises, ["raised KeyError", "no such column"]),
    (helpers.reward_non_numeric, ["non-numeric value 'great' for sample 0"]),
    (lambda p, c, **k: [math.inf, 0.0], ["returned inf"]),
    (lambda p, c, **k: [None, 0.0], ["returned None"]),
    (lambda p, c, **k: 1.0, ["returned float"]),
], ids=["wrong_length", "nan", "exception", "non_numeric", "inf", "none", "scalar"])
def test_reward_set_errors_name_the_function(fn, words):
    rs = RewardSet({"good": exact_match, "culprit": fn})
    with pytest.raises(RewardError) as e:
        rs(["abc>", "xyz>"], ["cba", "zyx"], answer=["cba", "zyx"])
    msg = str(e.value)
    assert "'culprit'" in msg and "'good'" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_reward_set_skip_marks_invalid():
    rs = RewardSet({"flaky": helpers.reward_nan_every_other, "one": lambda p, c, **k: [1.0] * len(c)},
                   nan_policy="skip")
    total, per_fn, valid = rs(["p"] * 4, ["c"] * 4)
    assert valid.tolist() == [True, False, True, False]
    assert per_fn["flaky"].tolist() == [1.0, 0.0, 1.0, 0.0] and torch.isfinite(total).all()
    with pytest.raises(RewardError):  # a non-numeric value is an error even with skip
        RewardSet({"bad": helpers.reward_non_numeric}, nan_policy="skip")(["p"], ["c"])


# --- tasks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [ReverseTask(), ArithmeticTask(), ReverseTask("ab", 2, 3)],
                         ids=["reverse", "arithmetic", "reverse_ab"])
def test_task_splits_are_disjoint(task):
    train = {r["prompt"] for seed in (0, 1) for r in task.rows("train", 3000, seed=seed)}
    test = {r["prompt"] for seed in (0, 1) for r in task.rows("test", 30, seed=seed)}
    assert train and test and not train & test
    assert all(task.split_of(p) == "train" for p in train) and all(task.split_of(p) == "test" for p in test)
    assert task.rows("train", 50, seed=3) == task.rows("train", 50, seed=3)  # deterministic
    with pytest.raises(ValueError, match="split"):
        task.rows("validation", 1)


def test_configured_task_splits_are_disjoint(tmp_path):
    for task in ("reverse", "arithmetic"):
        cfg = compose_train(tmp_path, [f"task={task}"])
        train = {r["prompt"] for r in instantiate(cfg.task.train).load()}
        val = {r["prompt"] for r in instantiate(cfg.task.val).load()}
        assert len(train) > 1000 and val and not train & val, task


def test_task_answers_are_correct():
    for r in ArithmeticTask(ops="+-*").rows("train", 200):
        a, op, b = __import__("re").fullmatch(r"(\d+)([+\-*])(\d+)=", r["prompt"]).groups()
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    for r in ReverseTask().rows("train", 200):
        assert r["prompt"] == r["answer"][::-1] + ">"


def test_prompt_blind_policy_cannot_score_on_reverse(tmp_path):
    """A policy that ignores the prompt has an expected reward that is a mixture of constant answers'
    rewards, so the best constant answer bounds it. partial_match scores positions beyond the answer
    as misses and characters outside the alphabet never hit, so the best constant is a string over
    the task alphabet of length <= max_len: enumerate them all (9331 for abcdef, 0..5)."""
    cfg = compose_train(tmp_path, ["task=reverse"])
    task = instantiate(cfg.task.train.task)
    rows = random.Random(0).sample(instantiate(cfg.task.val).load() + task.rows("train", 2000), 600)
    answers = [r["answer"] for r in rows]
    alpha = task.alphabet
    m = max(len(a) for a in answers)
    enc = np.full((len(answers), m), -1)
    for i, a in enumerate(answers):
        enc[i, : len(a)] = [alpha.index(ch) for ch in a]
    lens = np.array([len(a) for a in answers])
    best, best_str = 0.0, ""
    for k in range(1, task.max_len + 1):
        cands = np.array(list(itertools.product(range(len(alpha)), repeat=k)))  # [C, k]
        hits = (cands[:, None, :] == enc[None, :, :k]).sum(-1)  # [C, N]
        score = (hits / np.maximum(k, lens)[None, :]).mean(-1)  # [C]
        i = int(score.argmax())
        if score[i] > best:
            best, best_str = float(score[i]), "".join(alpha[j] for j in cands[i])
    # the vectorised score is partial_match's
    assert np.mean(partial_match([r["prompt"] for r in rows], [best_str] * len(rows), answer=answers)) == \
        pytest.approx(best)
    assert 0.05 < best < 0.3, (best, best_str)


# --- FileSource -----------------------------------------------------------------------------------

ROWS = [{"question": f"{i}+{i}=", "answer": 2 * i, "level": i % 3} for i in range(7)]


def _write(path, fmt):
    import pandas as pd

    df = pd.DataFrame(ROWS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_file_source_loads_and_renames(fmt, tmp_path):
    path = _write(tmp_path / f"data.{fmt}", fmt)
    rows = FileSource(path, prompt_column="question").load()
    assert [r["prompt"] for r in rows] == [r["question"] for r in ROWS]
    assert [int(r["answer"]) for r in rows] == [r["answer"] for r in ROWS]
    assert "question" not in rows[0] and rows[0]["level"] == 0
    limited = FileSource(path, prompt_column="question", limit=3, columns={"level": "difficulty"}).load()
    assert len(limited) == 3 and "difficulty" in limited[0] and "level" not in limited[0]
    with pytest.raises(ValueError) as e:
        FileSource(path).load()  # default prompt_column 'prompt' is missing
    assert "'prompt'" in str(e.value) and "question" in str(e.value)
    with pytest.raises(ValueError, match="'grade'"):
        FileSource(path, prompt_column="question", columns={"grade": "g"}).load()


def test_file_source_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FileSource(str(tmp_path / "nope.jsonl")).load()


def test_jsonl_task_trains_end_to_end(tmp_path):
    from .conftest import fit

    rows = [{"prompt": f"{i}+{i}=", "answer": 2 * i} for i in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_train(tmp_path / "run", ["task=jsonl", f"task.train.path={path}"])
    _, dm, trainer = fit(cfg)
    assert trainer.global_step == 2 and dm.val_rows is None


# --- PromptDataModule ------------------------------------------------------------------------------

SIMPLE_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
                   "{% if add_generation_prompt %}a:{% endif %}")


def test_data_module_batches(tmp_path):
    dm = PromptDataModule(TaskSource(ReverseTask(), size=10), TaskSource(ReverseTask(), split="test", size=3),
                          batch_size=4, val_batch_size=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(len(b["prompt"]) == 4 == len(b["answer"]) for b in batches)  # drop_last
    val = list(dm.val_dataloader())
    assert [len(b["prompt"]) for b in val] == [2, 1]
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataModule(TaskSource(ReverseTask(), size=10), batch_size=0)


def test_chat_template_requires_a_template(tiny_tokenizer):
    assert getattr(tiny_tokenizer, "chat_template", None) is None
    dm = PromptDataModule(TaskSource(ReverseTask(), size=4), tokenizer=tiny_tokenizer, chat_template=True)
    with pytest.raises(ValueError, match="chat_template"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="chat_template"):
        PromptDataModule(TaskSource(ReverseTask(), size=4), tokenizer=None, chat_template=True).setup("fit")


def test_chat_template_wraps_prompts(tiny_tokenizer):
    tiny_tokenizer.chat_template = SIMPLE_TEMPLATE
    src = TaskSource(ReverseTask(), size=4)
    dm = PromptDataModule(src, tokenizer=tiny_tokenizer, chat_template=True, system_prompt="rev")
    dm.setup("fit")
    raw = src.load()
    for r, out in zip(raw, dm.train_rows):
        assert out["prompt"] == f"s:rev|u:{r['prompt']}|a:" and out["question"] == r["prompt"]
        assert out["answer"] == r["answer"]
        ids = tiny_tokenizer(out["prompt"])["input_ids"]  # every character is in the tiny vocabulary
        assert tiny_tokenizer.unk_token_id not in ids
    dm2 = PromptDataModule(src, tokenizer=tiny_tokenizer, chat_template=True)
    dm2.setup("fit")
    assert dm2.train_rows[0]["prompt"] == f"u:{raw[0]['prompt']}|a:"


def test_unshuffled_prompts_come_in_the_sources_order(tmp_path):
    """data.shuffle=false: batch k is rows [k B, (k + 1) B) of the source, epoch after epoch (the
    loader and batch_at alike); the default shuffles them with the seed."""
    src = TaskSource(ReverseTask(), size=12)
    rows = [r["prompt"] for r in src.load()]
    dm = PromptDataModule(src, batch_size=4, seed=5, shuffle=False)
    dm.setup()
    loaded = [b["prompt"] for b in dm.train_dataloader()]
    assert loaded == [rows[0:4], rows[4:8], rows[8:12]]
    assert [dm.batch_at(k)["prompt"] for k in range(6)] == loaded + loaded
    shuffled = PromptDataModule(src, batch_size=4, seed=5)
    shuffled.setup()
    assert [b["prompt"] for b in shuffled.train_dataloader()] != loaded
    cfg = compose_train(tmp_path, ["data.shuffle=false"])
    from rlopt.train import build

    assert build(cfg)[1].shuffle is False
