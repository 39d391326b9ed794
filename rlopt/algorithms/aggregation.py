"""Loss aggregation: per-token values ``[N, T]`` -> scalar.

    agg = TokenMean()
    loss = agg(loss_tok, mask, normalizer=global_token_count)

Each mode divides a *sum* over the given rows by a normaliser. By default the normaliser is
computed from the rows given; pass ``normalizer=`` (the sum of ``agg.count(mask)`` over the whole
rollout batch, all minibatches and all ranks) to make gradient accumulation and data
parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

from torch import Tensor

from .registry import AGGREGATIONS, check_range, check_shapes


class Aggregation:
    """Base class: ``__call__ = numerator(values, mask) / normaliser``."""

    def count(self, mask: Tensor) -> Tensor:
        """This batch's contribution to the normaliser (a 0-dim float tensor)."""
        raise NotImplementedError

    def numerator(self, values: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, values: Tensor, mask: Tensor, normalizer: Tensor | float | None = None) -> Tensor:
        check_shapes(values=values, mask=mask)
        m = mask.to(values.dtype)  # [N, T]
        values = values.masked_fill(m == 0, 0.0)  # padding never contributes, even inf/NaN
        denom = self.count(m) if normalizer is None else normalizer
        if isinstance(denom, Tensor):
            denom = denom.to(values.dtype).clamp(min=1)
        else:
            denom = max(float(denom), 1.0)
        return self.numerator(values, m) / denom

    def params(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"


@AGGREGATIONS.register("token_mean")
class TokenMean(Aggregation):
    """``sum(l * mask) / sum(mask)`` over the batch: every token weighs the same (DAPO)."""

    def count(self, mask: Tensor) -> Tensor:
        return mask.float().sum()

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        return (values * m).sum()


@AGGREGATIONS.register("seq_mean_token_mean")
class SeqMeanTokenMean(Aggregation):
    """``mean_i(sum_t l*mask / sum_t mask)``: every sequence weighs the same (GRPO paper)."""

    def count(self, mask: Tensor) -> Tensor:
        return mask.new_tensor(float(mask.shape[0]), dtype=mask.float().dtype)

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        return ((values * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()


@AGGREGATIONS.register("seq_mean_token_sum")
class SeqMeanTokenSum(Aggregation):
    """``mean_i(sum_t l*mask)``: longer sequences weigh more (verl ``seq-mean-token-sum``)."""

    def count(self, mask: Tensor) -> Tensor:
        return mask.new_tensor(float(mask.shape[0]), dtype=mask.float().dtype)

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        return (values * m).sum()


@AGGREGATIONS.register("seq_mean_token_sum_norm")
class SeqMeanTokenSumNorm(Aggregation):
    """``mean_i(sum_t l*mask) / max_len`` with a constant ``max_len`` (Dr. GRPO, arXiv 2503.20783).

    ``max_len`` should be the generation budget (max new tokens); when None the padded width
    ``T`` of the tensor is used, which is constant only if every batch is padded to it.
    """

    def __init__(self, max_len: int | None = None) -> None:
        self.max_len = None if max_len is None else int(check_range("max_len", max_len, low=1))

    def count(self, mask: Tensor) -> Tensor:
        length = self.max_len if self.max_len is not None else mask.shape[1]
        return mask.new_tensor(float(mask.shape[0] * length), dtype=mask.float().dtype)

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        return (values * m).sum()
