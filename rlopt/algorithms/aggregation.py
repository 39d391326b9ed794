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

from .registry import AGGREGATIONS, Component, check_range, check_shapes


class Aggregation(Component):
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


# --- 2025-26 methods ---------------------------------------------------------------------------


@AGGREGATIONS.register("token_sum")
class TokenSum(Aggregation):
    """``sum(l * mask)`` over the whole batch, no normaliser (verl ``loss_agg_mode=token-sum``).

    The loss of a minibatch is the sum over its rows, so minibatch losses add up to the one-batch
    loss; ``count`` is 0 and any ``normalizer`` passed is ignored (the gradient scales with the
    number of tokens: lower the learning rate accordingly). Under data parallelism the module's
    world-size scaling makes it the sum over all ranks' tokens, as verl's ``* dp_size``.
    """

    def count(self, mask: Tensor) -> Tensor:
        return mask.new_zeros((), dtype=mask.float().dtype)

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        return (values * m).sum()

    def __call__(self, values: Tensor, mask: Tensor, normalizer: Tensor | float | None = None) -> Tensor:
        return super().__call__(values, mask, normalizer=1.0)


@AGGREGATIONS.register("prompt_mean")
class PromptMean(Aggregation):
    """Mean over prompts of each prompt's token mean: ``mean_p( sum_{i in p, t} l*mask / sum_{i in p, t} mask )``
    (ScaleRL, arXiv 2510.13786, "prompt-level" aggregation; SkyRL ``loss_reduction=prompt_mean``).

    Every prompt weighs the same; inside a prompt every token does. Rows are grouped contiguously,
    ``group_size`` rows a prompt (the module's layout). ``count`` is the number of prompts (empty
    prompts included, as ``seq_mean_token_mean`` counts empty rows), so with the global normaliser a
    minibatch loss is a sum over its *prompts* and minibatches add up exactly **provided every
    minibatch holds whole groups** (``requires_whole_groups``): a group split across minibatches
    would be normalised by a partial token count. ``group_size`` None (a preset read without Hydra)
    must be set before use (the module sets it from its own ``group_size``).
    """

    requires_whole_groups = True

    def __init__(self, group_size: int | None = None) -> None:
        self.group_size = None if group_size is None else int(check_range("group_size", group_size, low=1))

    def _groups(self, n: int) -> int:
        if self.group_size is None:
            raise ValueError("prompt_mean aggregation: group_size is None; set it to the number of completions per prompt")
        if n % self.group_size != 0:
            raise ValueError(f"prompt_mean aggregation: group_size={self.group_size} does not divide the {n} rows; "
                             "it needs whole groups (G contiguous rows per prompt)")
        return n // self.group_size

    def count(self, mask: Tensor) -> Tensor:
        return mask.new_tensor(float(self._groups(mask.shape[0])), dtype=mask.float().dtype)

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        b = self._groups(m.shape[0])
        tok_sum = (values * m).reshape(b, -1).sum(-1)  # [B]
        tok_cnt = m.reshape(b, -1).sum(-1)  # [B]
        return (tok_sum / tok_cnt.clamp(min=1)).sum()


@AGGREGATIONS.register("luspo")
class LUSPOAggregation(Aggregation):
    """LUSPO, Length-Unbiased Sequence Policy Optimization (arXiv 2602.05261): each sequence's loss
    scaled by its length, ``mean_i( |y_i| * mean_t l_it )`` (TRL ``loss_type="luspo"``).

    With GSPO's sequence ratio the per-token loss is constant over a row and this is
    ``mean_i(|y_i| * l_i)``; in general ``|y_i| * mean_t = sum_t``, so the value equals
    ``seq_mean_token_sum`` (it is kept as its own name so presets and peer names map one to one).
    ``count`` is the number of rows, so minibatch losses add up exactly.
    """

    def count(self, mask: Tensor) -> Tensor:
        return mask.new_tensor(float(mask.shape[0]), dtype=mask.float().dtype)

    def numerator(self, values: Tensor, m: Tensor) -> Tensor:
        lens = m.sum(-1)  # [N]
        seq_mean = (values * m).sum(-1) / lens.clamp(min=1)  # [N]
        return (lens * seq_mean).sum()
