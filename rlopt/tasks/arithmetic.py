"""Arithmetic tasks: ``ArithmeticTask`` (``"12+34="``), ``AdditionTask`` (in words, for instruct
models) and the suite's fixed-width multi-digit addition ``DigitAdditionTask``."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

from .base import ProceduralTask


class ArithmeticTask(ProceduralTask):
    """Integer arithmetic ``"12+34="`` -> ``"46"`` with operands in ``[0, max_value]``."""

    def __init__(self, ops: str = "+-", max_value: int = 99) -> None:
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops={ops!r}: use a non-empty subset of '+-*'")
        self.ops, self.max_value = ops, int(max_value)

    def make(self, rng: random.Random) -> dict[str, Any]:
        a, b, op = rng.randint(0, self.max_value), rng.randint(0, self.max_value), rng.choice(self.ops)
        val = a + b if op == "+" else a - b if op == "-" else a * b
        return {"prompt": f"{a}{op}{b}=", "answer": str(val)}


class AdditionTask(ProceduralTask):
    """Natural-language addition for instruct models: ``"What is 23 + 45? ..."`` -> ``"68"``.
    Operands have ``digits`` digits; use with ``data.chat_template=true``."""

    def __init__(self, digits: int = 2, instruction: str = "Reply with just the number.") -> None:
        if int(digits) < 1:
            raise ValueError(f"digits={digits} must be >= 1")
        self.digits, self.instruction = int(digits), instruction

    def make(self, rng: random.Random) -> dict[str, Any]:
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return {"prompt": f"What is {a} + {b}? {self.instruction}", "answer": str(a + b)}


class DigitAdditionTask(ProceduralTask):
    """Multi-digit addition, fixed width: ``"012+345="`` -> ``"0357"``. Knob: ``digits``.

    Operands are uniform in ``[0, N)``, ``N = 10^digits``, written with ``digits`` digits; the
    answer is the sum written with ``digits + 1`` digits (leading zeros kept), so every answer
    has the same length and ``partial_match`` compares digit with digit.

    Prompt-blind bound. Dense (``partial_match``): position 0 is the carry, 0 with probability
    ``p0 = P(a + b < N) = (N + 1) / 2N``; positions 1..digits are the digits of
    ``(a + b) mod N``, which is uniform (``a`` is), so each is a given digit with probability
    1/10. A constant completion of length ``k`` hits at most the sum of its positions' best
    probabilities over ``max(k, digits + 1)``: the best is ``"0"`` followed by any ``digits``
    digits, ``(p0 + digits / 10) / (digits + 1)``. Sparse: no sum is more likely than
    ``N - 1`` (``N`` of the ``N^2`` pairs), so ``1 / N``. Defaults (3 digits): dense 0.2001,
    sparse 0.001.
    """

    knob = "digits"

    def __init__(self, digits: int = 3) -> None:
        if int(digits) < 1:
            raise ValueError(f"digits={digits} must be >= 1")
        self.digits = int(digits)

    def make(self, rng: random.Random) -> dict[str, Any]:
        d, n = self.digits, 10 ** self.digits
        a, b = rng.randint(0, n - 1), rng.randint(0, n - 1)
        return {"prompt": f"{a:0{d}d}+{b:0{d}d}=", "answer": f"{a + b:0{d + 1}d}"}

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        n = 10 ** self.digits
        if kind == "sparse":
            return float(Fraction(1, n))
        if kind == "dense":
            return float((Fraction(n + 1, 2 * n) + Fraction(self.digits, 10)) / (self.digits + 1))
        raise ValueError(f"kind={kind!r} is not valid; valid choices: dense, sparse")
