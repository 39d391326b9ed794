"""KL estimators against a reference policy, per token ``[N, T]`` (Schulman, "Approximating KL").

    kl_tok = KL_ESTIMATORS.get("k3")(logp, ref_logp)

With ``x = ref_logp - logp`` on tokens sampled from the policy:
``k1 = -x`` (unbiased, can be negative), ``k2 = x^2 / 2`` (biased, low variance),
``k3 = exp(x) - x - 1`` (unbiased, non-negative; the GRPO paper's eq. 4). ``x`` is clamped to
``[-20, 20]`` so ``exp`` stays finite.

Two options of ``PolicyObjective`` build on these (not registered as estimators of their own):

- ``kl="k3+"`` (any name with a ``+``): straight-through, the estimator's value with the gradient
  of k2 (verl ``kl_penalty="k3+"``): ``k2 + sg(k3 - k2)``, see ``kl_k3_plus``. The k2 gradient
  ``(logp - ref_logp) * grad logp`` is the unbiased gradient of the reverse KL on-policy, where
  k3's own gradient is not.
- ``kl_is_corrected=True``: the per-token estimator times the token ratio ``pi_theta/pi_old``
  (DeepSeek-V3.2, arXiv 2512.02556 §3.1, "unbiased KL estimate"; TRL ``use_bias_correction_kl``,
  slime ``--use-unbiased-kl``). The paper differentiates through the ratio (so do TRL and
  slime): ``E_{pi_old}[r k3]`` is then an unbiased estimate of ``KL(pi_theta || pi_ref)`` *and* of
  its gradient when the samples come from pi_old. ``kl_is_detached=True`` stops the ratio's
  gradient instead (weights the k3 gradient only).
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


def kl_k3_plus(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Straight-through k3 (verl ``k3+``): the value of k3, the gradient of k2."""
    k2 = kl_k2(logp, ref_logp)
    return k2 + (kl_k3(logp, ref_logp) - k2).detach()
