"""Procedurally generated tasks with verifiable answers.

    task = ReverseTask(alphabet="abcde", min_len=3, max_len=5)
    rows = task.rows("train", 1000, seed=0)     # [{"prompt": "abc>", "answer": "cba"}, ...]

Train and test splits are disjoint: a problem belongs to the test split when a hash of its
prompt falls in the first ``test_percent`` of 100 buckets, whatever the seed.
"""

from __future__ import annotations

import random
import zlib
from typing import Any


class ProceduralTask:
    """Base class: subclasses implement ``make(rng) -> dict`` with at least ``prompt``, ``answer``."""

    test_percent = 10

    def make(self, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def split_of(self, prompt: str) -> str:
        return "test" if zlib.crc32(prompt.encode()) % 100 < self.test_percent else "train"

    def rows(self, split: str, size: int, seed: int = 0) -> list[dict[str, Any]]:
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} is not valid; valid choices: test, train")
        rng = random.Random(f"{type(self).__name__}-{split}-{seed}")
        out, tries = [], 0
        while len(out) < size:
            row = self.make(rng)
            tries += 1
            if self.split_of(row["prompt"]) == split:
                out.append(row)
            elif tries > 1000 * max(size, 1):
                raise ValueError(f"{type(self).__name__} cannot produce {size} {split} problems")
        return out


class ReverseTask(ProceduralTask):
    """Reverse a random string: ``"abc>"`` -> ``"cba"``. A policy that ignores the prompt can
    match a character only by chance (1/|alphabet| per position)."""

    def __init__(self, alphabet: str = "abcdef", min_len: int = 3, max_len: int = 5) -> None:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if len(set(alphabet)) < 2:
            raise ValueError("alphabet needs at least 2 distinct characters")
        self.alphabet, self.min_len, self.max_len = alphabet, min_len, max_len

    def make(self, rng: random.Random) -> dict[str, Any]:
        s = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))
        return {"prompt": s + ">", "answer": s[::-1]}


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
