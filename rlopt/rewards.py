"""Reward functions and the weighted set that scores a rollout.

A reward function takes the prompts and completions (lists of ``str``, one entry per
completion) plus every column of the data set as keyword arguments (lists aligned with the
completions), and ``completion_lengths`` (tokens), and returns one float per completion:

    def my_reward(prompts, completions, answer, **kwargs) -> list[float]: ...

Configs reference them by import path: ``{_target_: rlopt.rewards.exact_match, _partial_: true}``.
``RewardSet`` validates every output and names the function, sample and prompt on bad values.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import torch

RewardFn = Callable[..., Sequence[float]]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the stripped completion equals the answer, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def partial_match(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """Fraction of answer characters matched position by position, divided by the longer length."""
    out = []
    for c, a in zip(completions, answer):
        c, a = c.strip(), str(a).strip()
        hits = sum(x == y for x, y in zip(c, a))
        out.append(hits / max(len(c), len(a), 1))
    return out


def numeric_match(prompts: list[str], completions: list[str], answer: list[Any], tol: float = 1e-6,
                  **kwargs: Any) -> list[float]:
    """1.0 when the last number in the completion equals the numeric answer (within ``tol``)."""
    out = []
    for c, a in zip(completions, answer):
        nums = _NUMBER.findall(c)
        try:
            ok = bool(nums) and abs(float(nums[-1]) - float(a)) <= tol
        except (TypeError, ValueError):
            ok = False
        out.append(float(ok))
    return out


def format_match(prompts: list[str], completions: list[str], pattern: str = r"^-?\d+$", **kwargs: Any) -> list[float]:
    """1.0 when the stripped completion matches the regular expression ``pattern`` entirely."""
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def overlong_penalty(prompts: list[str], completions: list[str], completion_lengths: list[int],
                     max_len: int = 16, cache_len: int = 4, **kwargs: Any) -> list[float]:
    """DAPO soft overlong punishment (arXiv 2503.14476 eq. 13), by token count ``|y|``:
    0 if ``|y| <= max_len - cache_len``; ``((max_len - cache_len) - |y|) / cache_len`` up to
    ``max_len``; -1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    free = max_len - cache_len
    return [0.0 if n <= free else ((free - n) / cache_len if n <= max_len else -1.0) for n in completion_lengths]


class RewardError(ValueError):
    """A reward function failed or returned something unusable."""


class RewardSet:
    """Several reward functions with weights: ``total = sum_k w_k * r_k``.

    ``nan_policy``: ``"error"`` (default) raises on None / NaN / inf; ``"skip"`` marks that sample
    invalid (its advantage is zeroed by the estimator) and counts it.
    """

    def __init__(self, functions: Mapping[str, RewardFn], weights: Mapping[str, float] | None = None,
                 nan_policy: str = "error") -> None:
        if not functions:
            raise ValueError("rewards: at least one reward function is required")
        if nan_policy not in ("error", "skip"):
            raise ValueError(f"nan_policy={nan_policy!r} is not valid; valid choices: error, skip")
        weights = dict(weights or {})
        unknown = set(weights) - set(functions)
        if unknown:
            raise ValueError(f"reward_weights names unknown reward functions {sorted(unknown)}; "
                             f"the functions are {sorted(functions)}")
        for name, fn in functions.items():
            if not callable(fn):
                raise ValueError(f"reward function {name!r} is not callable: {fn!r}")
        self.functions = dict(functions)
        self.weights = {k: float(weights.get(k, 1.0)) for k in self.functions}
        self.nan_policy = nan_policy

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Returns ``(total [N], per-function [N] each, valid [N] bool)``."""
        n = len(completions)
        per_fn: dict[str, torch.Tensor] = {}
        valid = torch.ones(n, dtype=torch.bool)
        for name, fn in self.functions.items():
            try:
                out = fn(prompts, completions, **columns)
            except Exception as e:  # noqa: BLE001 - re-raised with the function's name
                raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            try:
                out = list(out)
            except TypeError:
                raise RewardError(f"reward function {name!r} returned {type(out).__name__}, expected a list of {n} floats") from None
            if len(out) != n:
                raise RewardError(f"reward function {name!r} returned {len(out)} values for {n} completions")
            vals = torch.empty(n, dtype=torch.float32)
            for i, v in enumerate(out):
                bad = None
                if v is None:
                    bad = "None"
                else:
                    try:
                        f = float(v)
                    except (TypeError, ValueError):
                        raise RewardError(f"reward function {name!r} returned a non-numeric value {v!r} for sample {i} "
                                          f"(prompt {prompts[i]!r})") from None
                    if not math.isfinite(f):
                        bad = repr(f)
                if bad is not None:
                    if self.nan_policy == "error":
                        raise RewardError(f"reward function {name!r} returned {bad} for sample {i} (prompt {prompts[i]!r}); "
                                          "set rewards.nan_policy=skip to zero that sample's advantage instead")
                    valid[i] = False
                    f = 0.0
                vals[i] = f
            per_fn[name] = vals
        total = sum(self.weights[k] * v for k, v in per_fn.items())
        return total, per_fn, valid


def math_answer(prompts: list[str], completions: list[str], answer: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when ``math-verify`` finds the completion's final answer (its last number, or its LaTeX)
    equivalent to the gold answer (numbers, fractions, LaTeX, ``\\boxed{}``). GSM8K-style gold
    answers ``"... #### 42"`` are reduced to what follows ``####``."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("math_answer needs math-verify: pip install math-verify") from e
    out = []
    for c, a in zip(completions, answer):
        gold_text = str(a).split("####")[-1].strip()
        final = _final_answer(c)
        gold, pred = parse(gold_text), parse(final) if final else []
        out.append(float(bool(gold) and bool(pred) and verify(gold, pred)))
    return out


def _final_answer(completion: str) -> str:
    """The completion's final answer: LaTeX (``\\boxed``, ``\\frac``) as written, otherwise its
    last number. math-verify alone would accept a restated question: it parses ``"23 + 79 ="``
    as the expression 23 + 79, which sympy evaluates to the correct 102 (a policy found this)."""
    if "\\" in completion:
        return completion
    nums = _NUMBER.findall(completion.replace(",", ""))
    return nums[-1] if nums else ""


_COUNTDOWN_EXPR = re.compile(r"^[\d\s+\-*/().]+$")


def _eval_arith(node: Any) -> float:
    import ast

    if isinstance(node, ast.Expression):
        return _eval_arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_arith(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_arith(node.left), _eval_arith(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b
    raise ValueError("not an arithmetic expression")


def countdown_check(prompts: list[str], completions: list[str], numbers: list[list[int]], target: list[int],
                    **kwargs: Any) -> list[float]:
    """1.0 when the completion (its last expression line) is an arithmetic expression that uses each given
    number at most once and evaluates to the target; parsed with ``ast``, never ``eval``."""
    import ast
    from collections import Counter

    out = []
    for c, nums, tgt in zip(completions, numbers, target):
        # the last line with something before any "=" ("3 * 4 = 12" and "3 * 4\n= 12" both give 3 * 4)
        exprs = [ln.split("=")[0].strip() for ln in c.strip().splitlines()]
        exprs = [e for e in exprs if e]
        expr = exprs[-1] if exprs else ""
        ok = False
        if expr and _COUNTDOWN_EXPR.fullmatch(expr):
            used = Counter(int(x) for x in re.findall(r"\d+", expr))
            if not used - Counter(int(n) for n in nums):
                try:
                    ok = abs(_eval_arith(ast.parse(expr, mode="eval")) - float(tgt)) < 1e-9
                except (ValueError, ZeroDivisionError, SyntaxError, RecursionError):
                    ok = False
        out.append(float(ok))
    return out
