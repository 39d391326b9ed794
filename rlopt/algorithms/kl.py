"""KL estimators against a reference policy, per token ``[N, T]`` (Schulman, "Approximating KL").

    kl_tok = KL_ESTIMATORS.get("k3")(logp, ref_logp)

With ``x = ref_logp - logp`` on tokens sampled from the policy:
``k1 = -x`` (unbiased, can be negative), ``k2 = x^2 / 2`` (biased, low variance),
``k3 = exp(x) - x - 1`` (unbiased, non-negative; the GRPO paper's eq. 4). ``x`` is clamped to
``[-20, 20]`` so ``exp`` stays finite.
"""

from __future__ import annotations

from torch import Tensor

from .registry import KL_ESTIMATORS, as_float, check_shapes

_CLAMP = 20.0


def _x(logp: Tensor, ref_logp: Tensor) -> Tensor:
    check_shapes(logp=logp, ref_logp=ref_logp)
    return (as_float(ref_logp).detach() - as_float(logp)).clamp(-_CLAMP, _CLAMP)  # [N, T]


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return -_x(logp, ref_logp)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * _x(logp, ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    x = _x(logp, ref_logp)
    return x.exp() - x - 1.0
