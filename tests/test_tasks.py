"""The task suite (rlopt/tasks/, configs/task/<name>.yaml, docs/tasks.md): generation, splits,
rewards, the tiny tokenizer's alphabet and each task's prompt-blind bound, found again by brute
force: every constant completion of a small instance scored with the task's own reward
functions on the exact problem distribution (``enumerate_outcomes``)."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from rlopt.tasks import (
    SUITE, CopyTask, DigitAdditionTask, KeyValueTask, MiniCountdownTask, ReverseTask, SortTask, countdown_value,
    enumerate_outcomes,
)
from rlopt.tiny import ALPHABET, build_tokenizer

from .conftest import compose_train

REPO = Path(__file__).resolve().parent.parent
#: the documented bounds of the default configurations (docstrings, configs, docs/tasks.md): dense, sparse
DOCUMENTED = {"reverse": (0.1417, 0.0015), "sort": (0.2941, 0.0093), "copy_distractor": (0.1417, 0.0015),
              "addition_digits": (0.2001, 0.001), "countdown_mini": (0.1225, 0.0145), "kv_recall": (0.1, 0.1)}
#: small instances whose every outcome and every relevant constant completion can be enumerated
SMALL = {
    "reverse": [ReverseTask("ab", 1, 3), ReverseTask("abc", 2, 3), ReverseTask("aab", 1, 2)],
    "sort": [SortTask("abc", 1, 3), SortTask("ab", 2, 4)],
    "copy_distractor": [CopyTask("ab", 1, 3, 2), CopyTask("abc", 2, 2, 0)],
    "addition_digits": [DigitAdditionTask(1), DigitAdditionTask(2)],
    "countdown_mini": [MiniCountdownTask(2, 4, 20), MiniCountdownTask(3, 3, 30)],
    "kv_recall": [KeyValueTask(2, "abc", "012"), KeyValueTask(1, "ab", "01", value_len=2)],
}
ALL_SMALL = [(n, t) for n, ts in SMALL.items() for t in ts]
SMALL_IDS = [f"{n}-{i}" for n, ts in SMALL.items() for i in range(len(ts))]


def rewards_of(task):
    return get_method(task.dense_reward), get_method(task.sparse_reward)


def columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}


def score(fn, rows, completions):
    return fn([r["prompt"] for r in rows], list(completions), **columns(rows))


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", list(SUITE))
def test_suite_config(name, tmp_path):
    """Each suite task has configs/task/<name>.yaml: its class, its dense reward as the training
    reward and its sparse reward as the accuracy; every character is in the tiny tokenizer."""
    cfg = compose_train(tmp_path, [f"task={name}"])
    task = instantiate(cfg.task.train.task)
    assert type(task) is SUITE[name] and task.knob in vars(task)
    (reward,) = cfg.task.rewards.values()
    assert reward._target_ == task.dense_reward and cfg.task.accuracy_fn._target_ == task.sparse_reward
    assert task.prompt_blind_bound("dense") == pytest.approx(DOCUMENTED[name][0], abs=6e-5)
    assert task.prompt_blind_bound("sparse") == pytest.approx(DOCUMENTED[name][1], rel=0.04)
    rows = instantiate(cfg.task.train).load()[:500] + instantiate(cfg.task.val).load()
    text = "".join(r["prompt"] + str(r["answer"]) for r in rows)
    assert set(text) <= set(ALPHABET), set(text) - set(ALPHABET)
    tok = build_tokenizer()
    assert tok.unk_token_id not in tok(text[:2000])["input_ids"]
    dense, sparse = rewards_of(task)
    assert score(dense, rows[:50], [str(r["answer"]) for r in rows[:50]]) == [1.0] * 50
    assert score(sparse, rows[:50], [str(r["answer"]) for r in rows[:50]]) == [1.0] * 50
    budget = OmegaConf.load(REPO / "configs" / "rollout" / "lean.yaml").max_new_tokens  # the default's (debug: 4)
    assert max(len(str(r["answer"])) for r in rows) <= budget
    # the default task is untouched
    assert compose_train(tmp_path / "d", [], base=("logger=none",)).hydra.runtime.choices.task == "reverse"


def test_docs_table_lists_every_task():
    doc = (REPO / "docs" / "tasks.md").read_text()
    for name, (dense, sparse) in DOCUMENTED.items():
        line = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{name}`")), None)
        assert line is not None, name
        assert f"{dense:g}" in line and SUITE[name].knob in line, line


# ------------------------------------------------------------------------------ generation and splits
@pytest.mark.parametrize("name", list(SUITE))
def test_generation_is_deterministic_and_splits_are_disjoint(name):
    task = SUITE[name]()
    a = task.rows("train", 300, seed=3)
    assert a == task.rows("train", 300, seed=3) and a != task.rows("train", 300, seed=4)
    assert task.rows("test", 20, seed=3) == task.rows("test", 20, seed=3)
    train = {r["prompt"] for s in (0, 1) for r in task.rows("train", 2000, seed=s)}
    test = {r["prompt"] for s in (0, 1) for r in task.rows("test", 100, seed=s)}
    assert train and test and not train & test
    assert {task.split_of(p) for p in train} == {"train"} and {task.split_of(p) for p in test} == {"test"}
    with pytest.raises(ValueError, match="split"):
        task.rows("val", 1)


def test_answers_are_correct():
    for r in SortTask().rows("train", 200):
        assert r["answer"] == "".join(sorted(r["prompt"][:-1]))
    for r in CopyTask(distractor_len=6).rows("train", 200):
        s, d = r["prompt"][:-1].split("|")
        assert r["answer"] == s and len(d) == 6
    for r in DigitAdditionTask(4).rows("train", 200):
        a, b = re.fullmatch(r"(\d{4})\+(\d{4})=", r["prompt"]).groups()
        assert r["answer"] == f"{int(a) + int(b):05d}"
    for r in KeyValueTask(6).rows("train", 200):
        pairs, key = re.fullmatch(r"(.*)\?(.)>", r["prompt"]).groups()
        table = dict(p.split("=") for p in pairs.split(","))
        assert len(table) == 6 and r["answer"] == table[key]
    for r in MiniCountdownTask(4, 12).rows("train", 200):
        assert r["prompt"] == ",".join(map(str, r["numbers"])) + f":{r['target']}>"
        assert countdown_value(r["answer"], r["numbers"]) == r["target"] and 0 < r["target"] <= 999


def test_knobs_change_difficulty_and_bad_values_are_refused():
    assert len(KeyValueTask(8).rows("train", 1)[0]["prompt"]) > len(KeyValueTask(2).rows("train", 1)[0]["prompt"])
    assert DigitAdditionTask(2).prompt_blind_bound("sparse") > DigitAdditionTask(3).prompt_blind_bound("sparse")
    assert SortTask(max_len=8).prompt_blind_bound("sparse") < SortTask(max_len=5).prompt_blind_bound("sparse")
    for bad in (lambda: SortTask("aab"), lambda: CopyTask("ab|"), lambda: KeyValueTask(3, keys="ab"),
                lambda: KeyValueTask(values="0"), lambda: DigitAdditionTask(0), lambda: MiniCountdownTask(5),
                lambda: MiniCountdownTask(3, 9, 10), lambda: SortTask(min_len=0)):
        with pytest.raises(ValueError):
            bad()


# ------------------------------------------------------------------------------ rewards
def _corruptions(answer: str, rng: random.Random) -> list[str]:
    out = [answer + answer[-1], answer[:-1], "", answer[::-1] + "x", "x" + answer]
    i = rng.randrange(len(answer))
    out.append(answer[:i] + ("1" if answer[i] != "1" else "2") + answer[i + 1:])
    return [c for c in out if c != answer]


@pytest.mark.parametrize("name", list(SUITE))
def test_rewards_in_unit_interval_and_exact_match_only_for_correct_answers(name):
    task, rng = SUITE[name](), random.Random(0)
    dense, sparse = rewards_of(task)
    rows = task.rows("train", 60, seed=1)
    garbage = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 10))) for _ in rows]
    for comps in ([str(r["answer"]) for r in rows], garbage):
        for fn in (dense, sparse):
            assert all(0.0 <= v <= 1.0 for v in score(fn, rows, comps))
    assert score(sparse, rows, [str(r["answer"]) for r in rows]) == [1.0] * len(rows)
    for r in rows:
        for wrong in _corruptions(str(r["answer"]), rng):
            correct = (countdown_value(wrong, r["numbers"]) == r["target"]) if name == "countdown_mini" else False
            assert score(sparse, [r], [wrong]) == [float(correct)], (r, wrong)
            assert 0.0 <= score(dense, [r], [wrong])[0] <= 1.0


def test_countdown_rewards():
    row = {"prompt": "3,5,7:22>", "numbers": [3, 5, 7], "target": 22}
    cases = {"3*5+7": (1, 1), "7+5*3": (1, 1), " (7+15) ": (0, 0), "3*5+7+7": (0, 0), "3.5*5": (0, 0),
             "3*5": (0, 1 - 7 / 22), "3*(5+7)": (0, 1 - 14 / 22), "5/0": (0, 0), "-3+5*7-10": (0, 0),
             "x": (0, 0), "": (0, 0), "7*3\n= 21": (0, 1 - 1 / 22), "3*7": (0, 1 - 1 / 22)}
    for comp, (exact, close) in cases.items():
        got = (score(get_method("rlopt.tasks.countdown_exact"), [row], [comp])[0],
               score(get_method("rlopt.tasks.countdown_closeness"), [row], [comp])[0])
        assert got == pytest.approx((exact, close)), comp


# ------------------------------------------------------------------------------ prompt-blind bounds
def test_enumeration_matches_sampling():
    """``enumerate_outcomes`` replays ``make`` exactly: its probabilities sum to 1 and agree with
    the frequencies of the real random generator."""
    for task in (MiniCountdownTask(3, 3, 30), KeyValueTask(2, "abc", "01"), SortTask("ab", 1, 3)):
        dist: dict[str, Fraction] = Counter()
        for p, row in enumerate_outcomes(task):
            dist[repr(row)] += p
        assert sum(dist.values()) == 1
        rng, n = random.Random(0), 40_000
        seen = Counter(repr(task.make(rng)) for _ in range(n))
        assert set(seen) <= set(dist)
        for k, p in dist.items():
            assert abs(seen[k] / n - float(p)) < 5 * (float(p) / n) ** 0.5 + 1e-3, (k, p, seen[k] / n)


def _expressions(numbers: tuple[int, ...]) -> set[str]:
    """Fully parenthesised expressions using each of ``numbers`` once (every order, every op)."""
    if len(numbers) == 1:
        return {str(numbers[0])}
    out = set()
    for r in range(1, len(numbers)):
        for left in set(itertools.combinations(range(len(numbers)), r)):
            a = tuple(numbers[i] for i in left)
            b = tuple(numbers[i] for i in range(len(numbers)) if i not in left)
            for x in _expressions(a):
                for y in _expressions(b):
                    out.update(f"({x}){op}({y})" for op in "+-*/")
    return out


def _candidates(name: str, task, answers: set[str]) -> list[str]:
    """Every constant completion that can be best. Strings: over the answers' characters plus one
    foreign character (all foreign characters score alike), up to one longer than the longest
    answer (longer ones only add misses). Countdown: every expression over every multiset of at
    most ``count`` allowed numbers (the docstring's argument), plus a few invalid strings."""
    if name == "countdown_mini":
        out = ["", "x", "1+"]
        for size in range(1, task.count + 1):
            for ms in itertools.combinations_with_replacement(range(1, task.max_number + 1), size):
                out += sorted(_expressions(ms)) + ["-" + e for e in sorted(_expressions(ms))[:3]]
        return out
    chars = sorted(set("".join(answers))) + ["~"]
    longest = max(map(len, answers))
    return ["".join(c) for k in range(longest + 2) for c in itertools.product(chars, repeat=k)]


@pytest.mark.parametrize("name,task", ALL_SMALL, ids=SMALL_IDS)
def test_prompt_blind_bound_by_brute_force(name, task):
    groups: dict[str, tuple[Fraction, dict]] = {}
    for p, row in enumerate_outcomes(task):  # rows that score alike are merged
        key = repr({k: v for k, v in row.items() if k != "prompt"} if name != "countdown_mini"
                   else (sorted(row["numbers"]), row["target"]))
        q, r = groups.get(key, (Fraction(0), row))
        groups[key] = (q + p, r)
    probs = [float(p) for p, _ in groups.values()]
    rows = [r for _, r in groups.values()]
    assert sum(probs) == pytest.approx(1.0)
    dense, sparse = rewards_of(task)
    for kind, fn in (("dense", dense), ("sparse", sparse)):
        best, best_c = -1.0, None
        for c in _candidates(name, task, {str(r["answer"]) for r in rows}):
            v = sum(p * s for p, s in zip(probs, score(fn, rows, [c] * len(rows))))
            if v > best:
                best, best_c = v, c
        assert task.prompt_blind_bound(kind) == pytest.approx(best, abs=1e-12), (kind, best_c)


def test_reverse_bound_matches_the_sampled_search_of_test_rewards_data():
    """test_rewards_data.py searches constant strings on 600 sampled rows of the default reverse
    task; the closed form agrees with a larger sample."""
    task = ReverseTask()
    rows = task.rows("train", 5000, seed=0)
    dense, _ = rewards_of(task)
    got = sum(score(dense, rows, ["aaaa"] * len(rows))) / len(rows)
    assert got == pytest.approx(task.prompt_blind_bound("dense"), abs=0.01)
