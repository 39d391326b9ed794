"""Run names of a sweep: the Hydra overrides that name a TensorBoard run (``algorithm=gspo,seed=1``).

Shared by ``rlopt.report`` (which re-exports every name here), ``rlopt.report_plots`` and
``rlopt.stats``. Pure string functions: no file access.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

_SEED = re.compile(r"^\+{0,2}seed=(.*)$")


def split_overrides(name: str) -> list[str]:
    """``"a=1,b=[2,3]"`` -> ``["a=1", "b=[2,3]"]`` (commas inside brackets or quotes are kept)."""
    items, depth, quote, cur = [], 0, "", []
    for ch in name:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [i for i in items if i]


def parse_overrides(name: str) -> dict[str, str]:
    """``"algorithm=gspo,seed=1"`` -> ``{"algorithm": "gspo", "seed": "1"}``."""
    out = {}
    for item in split_overrides(name):
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def without_keys(run: str, keys: Iterable[str], empty: str = "default") -> str:
    """The run name (its last path component) without the overrides of ``keys`` (``empty`` if
    nothing is left); a path prefix (``sweepA/...``) is kept."""
    keys = set(keys)
    prefix, _, base = run.rstrip("/").rpartition("/")
    name = ",".join(i for i in split_overrides(base) if i.partition("=")[0].lstrip("+~") not in keys) or empty
    return f"{prefix}/{name}" if prefix else name


def config_name(run: str) -> str:
    """The run name without its ``seed=...`` override (``"default"`` if nothing is left)."""
    prefix, _, base = run.rstrip("/").rpartition("/")
    name = ",".join(i for i in split_overrides(base) if not _SEED.match(i)) or "default"
    return f"{prefix}/{name}" if prefix else name


def run_seed(run: str) -> float:
    """The ``seed=...`` override of a run name as a number (NaN if absent or not a number)."""
    for item in split_overrides(run.rstrip("/").rpartition("/")[2]):
        m = _SEED.match(item)
        if m:
            try:
                return float(m.group(1))
            except ValueError:
                return math.nan
    return math.nan


def short_labels(names: Iterable[str]) -> dict[str, str]:
    """Legend labels: each name without the overrides that all names share."""
    names = list(dict.fromkeys(names))
    parts = {n: split_overrides(n) for n in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(names) > 1 else set()
    return {n: ",".join(i for i in parts[n] if i not in common) or n for n in names}
