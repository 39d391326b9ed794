"""The base of every procedural task, the exact enumeration of a task's problem distribution
and the prompt-blind bound shared by the string tasks.

A *prompt-blind* policy draws its completion from one distribution whatever the prompt. Its
expected reward is then an average, over its completions, of the expected reward of a
*constant* completion, so it is at most the best constant completion's expected reward: that
maximum is the task's prompt-blind bound (each task argues its value in its docstring, and
``tests/test_tasks.py`` finds it again by brute force on small instances).
"""

from __future__ import annotations

import random
import zlib
from fractions import Fraction
from typing import Any, Iterator


class ProceduralTask:
    """Base class: subclasses implement ``make(rng) -> dict`` with at least ``prompt``, ``answer``.

    ``make`` may draw only with ``rng.choice``, ``rng.randint`` and ``rng.sample`` (what
    :func:`enumerate_outcomes` can replay). Suite tasks also set ``knob`` (the name of their
    difficulty parameter), ``dense_reward`` / ``sparse_reward`` (the import paths of their
    reward functions) and implement ``prompt_blind_bound(kind)`` with ``kind`` ``"dense"`` or
    ``"sparse"``.
    """

    test_percent = 10
    knob: str | None = None
    dense_reward = "rlopt.rewards.partial_match"
    sparse_reward = "rlopt.rewards.exact_match"

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

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        raise NotImplementedError(f"{type(self).__name__} documents no prompt-blind bound")


# ------------------------------------------------------------------------------ exact enumeration
class _Replay:
    """A stand-in for ``random.Random`` that replays a fixed list of decisions (then takes 0s)
    and records each decision's number of options."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.taken, self.arity = script, [], []

    def _pick(self, n: int) -> int:
        if n < 1:
            raise ValueError("a choice among no options")
        i = self.script[len(self.taken)] if len(self.taken) < len(self.script) else 0
        self.taken.append(i)
        self.arity.append(n)
        return i

    def choice(self, seq):
        return seq[self._pick(len(seq))]

    def randint(self, a: int, b: int) -> int:
        return a + self._pick(b - a + 1)

    def sample(self, population, k: int) -> list:
        pool = list(population)
        return [pool.pop(self._pick(len(pool))) for _ in range(k)]


def enumerate_outcomes(task: ProceduralTask, limit: int = 2_000_000) -> Iterator[tuple[Fraction, dict[str, Any]]]:
    """Every outcome of ``task.make`` with its exact probability (before the train/test split),
    by replaying ``make`` through each sequence of decisions (``rng.choice`` / ``randint`` /
    ``sample`` are uniform). The probabilities sum to 1. Raises past ``limit`` outcomes."""
    script: list[int] = []
    for count in range(limit + 1):
        rng = _Replay(script)
        row = task.make(rng)  # type: ignore[arg-type]
        p = Fraction(1)
        for n in rng.arity:
            p /= n
        yield p, row
        taken, arity = rng.taken, rng.arity
        i = len(taken) - 1
        while i >= 0 and taken[i] + 1 >= arity[i]:
            i -= 1
        if i < 0:
            return
        script = taken[:i] + [taken[i] + 1]
    raise ValueError(f"{type(task).__name__}: more than {limit} outcomes to enumerate")


# ------------------------------------------------------------------------------ bounds of i.i.d. strings
def length_probs(min_len: int, max_len: int) -> dict[int, Fraction]:
    """``rng.randint(min_len, max_len)``: each length equally likely."""
    return {n: Fraction(1, max_len - min_len + 1) for n in range(min_len, max_len + 1)}


def iid_string_bound(p_char: Fraction, lengths: dict[int, Fraction], kind: str) -> float:
    """Best expected reward of a constant completion ``c`` when the answer has a random length
    ``L`` (``lengths``) and each of its characters equals a given character with probability
    at most ``p_char``, independently of ``L``.

    - ``"sparse"`` (exact match): ``P(answer = c) <= P(L = len c) p_char^len(c)``, reached by
      a most likely character repeated: ``max_n P(L = n) p_char^n``.
    - ``"dense"`` (``partial_match``: position-wise hits / ``max(len c, L)``): the expected
      hits of a ``k``-character ``c`` are at most ``p_char min(k, L)``, so the bound is
      ``p_char max_k E[min(k, L) / max(k, L)]`` (``k`` beyond the longest answer only adds
      misses), reached by repeating a most likely character ``k`` times."""
    if kind == "sparse":
        return float(max(p * p_char ** n for n, p in lengths.items()))
    if kind == "dense":
        return float(p_char * max(sum(p * Fraction(min(k, n), max(k, n)) for n, p in lengths.items())
                                  for k in range(1, max(lengths) + 1)))
    raise ValueError(f"kind={kind!r} is not valid; valid choices: dense, sparse")


def check_alphabet(alphabet: str, min_distinct: int = 2) -> str:
    if len(set(alphabet)) < min_distinct:
        raise ValueError(f"alphabet {alphabet!r} needs at least {min_distinct} distinct characters")
    return alphabet


def check_lengths(min_len: int, max_len: int) -> tuple[int, int]:
    if not 1 <= int(min_len) <= int(max_len):
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    return int(min_len), int(max_len)
