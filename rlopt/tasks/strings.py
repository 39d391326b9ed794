"""String tasks of the suite: reverse, sort, copy past a distractor, key-value recall.

Dense reward: ``rlopt.rewards.partial_match`` (position-wise character hits divided by the
longer of completion and answer); sparse reward: ``rlopt.rewards.exact_match``.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any

from .base import ProceduralTask, check_alphabet, check_lengths, iid_string_bound, length_probs


class ReverseTask(ProceduralTask):
    """Reverse a random string: ``"abc>"`` -> ``"cba"``. Knob: ``max_len`` (and the alphabet).

    Prompt-blind bound: the answer's characters are independent of its length, each equal to a
    given character with probability at most ``p = max count / len(alphabet)`` (``1/|A|`` for
    distinct characters), so ``base.iid_string_bound`` applies: dense
    ``p max_k E[min(k, L) / max(k, L)]``, sparse ``P(L = min_len) p^min_len``. Defaults
    (``abcdef``, 3..5): dense 0.1417 (a 4-character constant), sparse 1/648 = 0.0015.
    """

    knob = "max_len"

    def __init__(self, alphabet: str = "abcdef", min_len: int = 3, max_len: int = 5) -> None:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if len(set(alphabet)) < 2:
            raise ValueError("alphabet needs at least 2 distinct characters")
        self.alphabet, self.min_len, self.max_len = alphabet, min_len, max_len

    def make(self, rng: random.Random) -> dict[str, Any]:
        s = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))
        return {"prompt": s + ">", "answer": s[::-1]}

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        p = Fraction(max(self.alphabet.count(c) for c in set(self.alphabet)), len(self.alphabet))
        return iid_string_bound(p, length_probs(self.min_len, self.max_len), kind)


class CopyTask(ProceduralTask):
    """Copy a string past a distractor: ``"abc|fedc>"`` -> ``"abc"``. Knob: ``distractor_len``
    (random characters between the string and where the answer starts).

    Prompt-blind bound: the answer is an i.i.d. uniform string over the (distinct) alphabet with
    a uniform length in ``min_len..max_len``, as in reverse: dense ``(1/|A|) max_k
    E[min(k, L) / max(k, L)]``, sparse ``|A|^-min_len / (max_len - min_len + 1)``. Defaults
    (``abcdef``, 3..5): dense 0.1417, sparse 0.0015, whatever the distractor length.
    """

    knob = "distractor_len"

    def __init__(self, alphabet: str = "abcdef", min_len: int = 3, max_len: int = 5, distractor_len: int = 4) -> None:
        self.alphabet = check_alphabet(alphabet)
        if len(set(alphabet)) != len(alphabet) or set(alphabet) & set("|>"):
            raise ValueError(f"alphabet {alphabet!r}: distinct characters, without '|' and '>'")
        self.min_len, self.max_len = check_lengths(min_len, max_len)
        if int(distractor_len) < 0:
            raise ValueError(f"distractor_len={distractor_len} must be >= 0")
        self.distractor_len = int(distractor_len)

    def make(self, rng: random.Random) -> dict[str, Any]:
        s = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))
        d = "".join(rng.choice(self.alphabet) for _ in range(self.distractor_len))
        return {"prompt": f"{s}|{d}>", "answer": s}

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        return iid_string_bound(Fraction(1, len(self.alphabet)), length_probs(self.min_len, self.max_len), kind)


class SortTask(ProceduralTask):
    """Sort the characters of a random string: ``"dbca:"`` -> ``"abcd"``. Knob: ``max_len``.

    Prompt-blind bound: the answer is the sorted string, whose position ``i`` is the order
    statistic ``S_i``: with ``m`` distinct characters ``c_0 < ... < c_{m-1}``,
    ``P(S_i <= c_j | L) = P(Binomial(L, (j+1)/m) >= i+1)``. A constant ``c`` of length ``k``
    scores ``sum_L P(L) / max(k, L) * sum_{i < min(k, L)} P(S_i = c_i | L)``, which separates by
    position, so the best is ``max_k sum_{i<k} max_j sum_{L > i} P(L) / max(k, L) P(S_i = c_j | L)``
    (dense; about twice reverse's, since the ends of a sorted string are predictable).
    Sparse: the most likely sorted string has balanced character counts, probability
    ``L! / prod(n_c!) / m^L``; the bound is its maximum over lengths. Defaults (``abcdef``,
    3..5): dense 0.2941, sparse 0.0093 (three distinct characters: 3!/6^3, times P(L = 3) = 1/3).
    """

    knob = "max_len"

    def __init__(self, alphabet: str = "abcdef", min_len: int = 3, max_len: int = 5) -> None:
        self.alphabet = check_alphabet(alphabet)
        if len(set(alphabet)) != len(alphabet) or ":" in alphabet:
            raise ValueError(f"alphabet {alphabet!r}: distinct characters, without ':'")
        self.min_len, self.max_len = check_lengths(min_len, max_len)

    def make(self, rng: random.Random) -> dict[str, Any]:
        s = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))
        return {"prompt": s + ":", "answer": "".join(sorted(s))}

    def _order_stat(self, n: int, i: int, j: int) -> Fraction:
        """P(S_i = c_j) for a length-n string: P(S_i <= c_j) - P(S_i <= c_{j-1})."""
        m = len(self.alphabet)

        def at_most(jj: int) -> Fraction:  # P(Binomial(n, (jj+1)/m) >= i+1)
            q = Fraction(jj + 1, m)
            return sum((math.comb(n, r) * q ** r * (1 - q) ** (n - r) for r in range(i + 1, n + 1)), Fraction(0))

        return at_most(j) - (at_most(j - 1) if j > 0 else Fraction(0))

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        lengths, m = length_probs(self.min_len, self.max_len), len(self.alphabet)
        if kind == "sparse":
            best = Fraction(0)
            for n, p in lengths.items():
                q, r = divmod(n, m)
                ways = Fraction(math.factorial(n), math.factorial(q + 1) ** r * math.factorial(q) ** (m - r))
                best = max(best, p * ways / m ** n)
            return float(best)
        if kind != "dense":
            raise ValueError(f"kind={kind!r} is not valid; valid choices: dense, sparse")
        stats = {(n, i, j): self._order_stat(n, i, j) for n in lengths for i in range(n) for j in range(m)}
        best = Fraction(0)
        for k in range(1, self.max_len + 1):
            total = sum((max(sum((p / max(k, n) * stats[n, i, j] for n, p in lengths.items() if n > i), Fraction(0))
                             for j in range(m)) for i in range(k)), Fraction(0))
            best = max(best, total)
        return float(best)


class KeyValueTask(ProceduralTask):
    """Recall the value stored under a key: ``"c=4,a=9,f=2?a>"`` -> ``"9"``. Knob: ``n_pairs``
    (how many pairs the prompt lists; ``value_len`` sets each value's length).

    Keys are distinct (``rng.sample``), each value an i.i.d. uniform string over ``values``,
    the queried key uniform: the answer is a uniform string of length ``value_len``, whatever
    the number of pairs. Prompt-blind bound (``base.iid_string_bound`` with one length):
    dense ``1/|values|``, sparse ``|values|^-value_len``. Defaults (4 pairs, digits, one
    character): 0.1 and 0.1.
    """

    knob = "n_pairs"

    def __init__(self, n_pairs: int = 4, keys: str = "abcdefghijklmnopqrstuvwxyz", values: str = "0123456789",
                 value_len: int = 1) -> None:
        for name, chars in (("keys", keys), ("values", values)):
            if len(set(chars)) != len(chars) or set(chars) & set("=,?>"):
                raise ValueError(f"{name}={chars!r}: distinct characters, without '=', ',', '?', '>'")
        check_alphabet(values)
        if not 1 <= int(n_pairs) <= len(keys):
            raise ValueError(f"n_pairs={n_pairs} must be between 1 and the number of keys ({len(keys)})")
        if int(value_len) < 1:
            raise ValueError(f"value_len={value_len} must be >= 1")
        self.n_pairs, self.keys, self.values, self.value_len = int(n_pairs), keys, values, int(value_len)

    def make(self, rng: random.Random) -> dict[str, Any]:
        ks = rng.sample(self.keys, self.n_pairs)
        vs = ["".join(rng.choice(self.values) for _ in range(self.value_len)) for _ in ks]
        q = rng.randint(0, self.n_pairs - 1)
        return {"prompt": ",".join(f"{k}={v}" for k, v in zip(ks, vs)) + f"?{ks[q]}>", "answer": vs[q]}

    def prompt_blind_bound(self, kind: str = "dense") -> float:
        return iid_string_bound(Fraction(1, len(self.values)), {self.value_len: Fraction(1)}, kind)
