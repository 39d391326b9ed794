"""Countdown (the numbers game): ``CountdownTask`` in words for instruct models, and the suite's
compact ``MiniCountdownTask`` for the tiny model, with its rewards ``countdown_exact`` (sparse)
and ``countdown_closeness`` (dense)."""

from __future__ import annotations

import ast
import itertools
import random
import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from ..rewards import _eval_arith
from .base import ProceduralTask, enumerate_outcomes


class CountdownTask(ProceduralTask):
    """The numbers game: reach ``target`` with ``numbers`` (each at most once) and + - * /.

    Targets are made by combining a random subset of the numbers, so every problem is solvable.
    The reward is ``rlopt.rewards.countdown_check`` (exact, by safe evaluation).
    """

    def __init__(self, count: int = 3, max_number: int = 20,
                 instruction: str = "Reply with the expression only.") -> None:
        if not 2 <= int(count) <= 6:
            raise ValueError(f"count={count} must be between 2 and 6")
        self.count, self.max_number, self.instruction = int(count), int(max_number), instruction

    def make(self, rng: random.Random) -> dict[str, Any]:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.count)]
            expr = str(nums[0])
            value = nums[0]
            for n in nums[1:rng.randint(2, self.count)]:
                op = rng.choice("+-*")
                expr = f"({expr} {op} {n})"
                value = value + n if op == "+" else value - n if op == "-" else value * n
            if 0 < value <= 1000:
                break
        listed = ", ".join(map(str, nums))
        return {"prompt": f"Using the numbers [{listed}], make {value}. Use each number at most once, "
                          f"with + - * / and parentheses. {self.instruction}",
                "numbers": nums, "target": value, "answer": expr}


# ------------------------------------------------------------------------------ the compact suite task
_EXPR = re.compile(r"[\d\s+\-*/()]+")  # integers only: no '.', so no literal like 3.5


def countdown_value(completion: str, numbers: list[int]) -> float | None:
    """The value of the completion's expression (its last line, up to any ``=``) if it is an
    arithmetic expression of integer literals (+ - * /, parentheses, unary minus) that uses each
    of ``numbers`` at most once; None otherwise (parsed with ``ast``, never ``eval``)."""
    exprs = [ln.split("=")[0].strip() for ln in completion.strip().splitlines()]
    exprs = [e for e in exprs if e]
    expr = exprs[-1] if exprs else ""
    if not expr or not _EXPR.fullmatch(expr):
        return None
    if Counter(int(x) for x in re.findall(r"\d+", expr)) - Counter(int(n) for n in numbers):
        return None
    try:
        return float(_eval_arith(ast.parse(expr, mode="eval")))
    except (ValueError, ZeroDivisionError, SyntaxError, RecursionError, OverflowError):
        return None


def countdown_exact(prompts: list[str], completions: list[str], numbers: list[list[int]], target: list[int],
                    **kwargs: Any) -> list[float]:
    """Sparse: 1.0 when the expression (``countdown_value``) equals the target, else 0.0."""
    out = []
    for c, nums, t in zip(completions, numbers, target):
        v = countdown_value(c, nums)
        out.append(float(v is not None and abs(v - float(t)) < 1e-9))
    return out


def countdown_closeness(prompts: list[str], completions: list[str], numbers: list[list[int]], target: list[int],
                        **kwargs: Any) -> list[float]:
    """Dense: ``max(0, 1 - |value - target| / target)`` for a valid expression (``countdown_value``:
    only the given numbers, each at most once), 0.0 otherwise. Targets are positive."""
    out = []
    for c, nums, t in zip(completions, numbers, target):
        v = countdown_value(c, nums)
        out.append(0.0 if v is None else max(0.0, 1.0 - abs(v - float(t)) / abs(float(t))))
    return out


@lru_cache(maxsize=None)
def expression_values(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Every value of an expression that uses each of ``numbers`` (sorted) exactly once, with
    + - * / and any parentheses (division by zero left out)."""
    if len(numbers) == 1:
        return frozenset({Fraction(numbers[0])})
    out: set[Fraction] = set()
    idx = range(len(numbers))
    for r in range(1, len(numbers)):
        for left in itertools.combinations(idx, r):  # ordered splits: both operand orders are seen
            a = tuple(sorted(numbers[i] for i in left))
            b = tuple(sorted(numbers[i] for i in idx if i not in left))
            for x in expression_values(a):
                for y in expression_values(b):
                    out.update((x + y, x - y, x * y))
                    if y != 0:
                        out.add(x / y)
    return frozenset(out)


class MiniCountdownTask(ProceduralTask):
    """Countdown for the tiny model: reach the target with some of the numbers, each at most
    once, and + - * /: ``"3,5,7:22>"`` -> ``"3*5+7"`` (any correct expression scores). Knob:
    ``count`` (how many numbers; ``max_number`` bounds them).

    A target is made from the first ``k`` numbers (``k`` uniform in 2..count), each step with
    an operation chosen uniformly among those that keep the value in ``1..max_target``, so
    every problem is solvable. Rewards: ``countdown_exact`` (sparse), ``countdown_closeness``
    (dense).

    Prompt-blind bound: a completion that scores at all is an expression whose integer literals
    form a multiset ``M`` of the problem's numbers; unary minus only flips a (sub)value's
    sign, so its value, when positive, is one of ``expression_values(M)`` (each number of ``M``
    once, + - * /). A constant completion therefore scores ``sum_problems P 1[M in numbers]
    score(v, target)`` for some ``(M, v)``; ``prompt_blind_bound`` takes the maximum over every
    multiset of at most ``count`` numbers of ``1..max_number`` and every value, on the exact
    problem distribution (``base.enumerate_outcomes``; about 3 s for the defaults). Defaults
    (3 numbers of 1..9): dense 0.1225, sparse 0.0145.
    """

    knob = "count"
    dense_reward = "rlopt.tasks.countdown_closeness"
    sparse_reward = "rlopt.tasks.countdown_exact"

    def __init__(self, count: int = 3, max_number: int = 9, max_target: int = 999) -> None:
        if not 2 <= int(count) <= 4:
            raise ValueError(f"count={count} must be between 2 and 4")
        if not 2 <= int(max_number) or 2 * int(max_number) > int(max_target):
            raise ValueError(f"need 2 <= max_number and 2 * max_number <= max_target, got {max_number}, {max_target}")
        self.count, self.max_number, self.max_target = int(count), int(max_number), int(max_target)

    def make(self, rng: random.Random) -> dict[str, Any]:
        nums = [rng.randint(1, self.max_number) for _ in range(self.count)]
        k = rng.randint(2, self.count)
        value, expr, is_sum = nums[0], str(nums[0]), False
        for n in nums[1:k]:
            nxt = {"+": value + n, "-": value - n, "*": value * n}
            # '+' or '-' always fits: value + n > max_target >= 2 n means value > n
            op = rng.choice([o for o in "+-*" if 0 < nxt[o] <= self.max_target])
            expr = f"({expr}){op}{n}" if op == "*" and is_sum else f"{expr}{op}{n}"
            value, is_sum = nxt[op], op != "*"
        return {"prompt": ",".join(map(str, nums)) + f":{value}>", "numbers": nums, "target": value, "answer": expr}

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        if kind not in ("dense", "sparse"):
            raise ValueError(f"kind={kind!r} is not valid; valid choices: dense, sparse")
        dist: dict[tuple[tuple[int, ...], int], Fraction] = {}
        for p, row in enumerate_outcomes(self):
            key = (tuple(sorted(row["numbers"])), int(row["target"]))
            dist[key] = dist.get(key, Fraction(0)) + p
        probs = np.array([float(p) for p in dist.values()])
        targets = np.array([t for _, t in dist], dtype=float)
        counts = [Counter(ns) for ns, _ in dist]
        best = 0.0
        for size in range(1, self.count + 1):
            for multiset in itertools.combinations_with_replacement(range(1, self.max_number + 1), size):
                need = Counter(multiset)
                has = np.array([not need - c for c in counts])
                if not has.any():
                    continue
                vals = np.array([float(v) for v in expression_values(multiset) if v > 0])
                if not len(vals):
                    continue
                t, w = targets[has], probs[has]
                if kind == "sparse":
                    score = (np.abs(vals[:, None] - t[None, :]) < 1e-9).astype(float) @ w
                else:
                    score = np.maximum(0.0, 1.0 - np.abs(vals[:, None] - t[None, :]) / t[None, :]) @ w
                best = max(best, float(score.max()))
        return best
