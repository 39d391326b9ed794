"""Name -> class registries, so configs can say ``clip: ppo`` instead of an import path.

    from rlopt.algorithms.registry import CLIPPING
    clip = CLIPPING.build("ppo", eps_low=0.2, eps_high=0.28)

An unknown name raises ``ValueError`` listing the registered choices.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


class Registry:
    """A small named collection of component classes of one kind (advantage, ratio, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            setattr(obj, "registered_name", name)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


class Component:
    """Base of every registered component: ``params()`` (its public attributes, what its config sets)
    and a ``repr`` that shows them."""

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"


ADVANTAGES = Registry("advantage estimator")
RATIOS = Registry("ratio scheme")
CLIPPING = Registry("clipping strategy")
AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")
CORRECTIONS = Registry("behaviour correction")
MASKS = Registry("token mask")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the given interval."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if v != v:
        raise ValueError(f"{name} must be a number, got NaN")
    bad = (
        (low is not None and (v < low or (v == low and not low_inclusive)))
        or (high is not None and (v > high or (v == high and not high_inclusive)))
    )
    if bad:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name}={value!r} is out of range; expected a value in {lo}, {hi}")
    return v


def check_shapes(**tensors: Any) -> None:
    """Raise ``ValueError`` naming the tensors unless all given (non-None) tensors share a shape."""
    given = {k: tuple(t.shape) for k, t in tensors.items() if t is not None}
    if len(set(given.values())) > 1:
        desc = ", ".join(f"{k}{list(s)}" for k, s in given.items())
        raise ValueError(f"shape mismatch: {desc} must all have the same shape [N, T]")


def as_float(x: Any) -> Any:
    """Upcast to float32 for the math, but keep float64 as float64 (never silently downcast)."""
    return x if x.dtype == torch.float64 else x.float()
