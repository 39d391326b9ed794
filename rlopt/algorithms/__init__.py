"""Pure-tensor policy-optimisation math (no Lightning): advantages, ratios, clipping,
aggregation, KL, the composed objective, chunked log-probs and named presets.

    from rlopt.algorithms import GroupBaseline, PolicyObjective, PPOClip
    adv = GroupBaseline()(rewards, mask, group_size=4)                       # [N, T]
    obj = PolicyObjective(ratio="sequence", clip=PPOClip(3e-4, 4e-4), aggregation="seq_mean_token_mean")
    loss, metrics = obj(logp, old_logp, adv, mask)
"""

from .advantages import AdvantageEstimator, DiscountedReturn, GroupBaseline, GroupContrast
from .aggregation import Aggregation, SeqMeanTokenMean, SeqMeanTokenSum, SeqMeanTokenSumNorm, TokenMean
from .clipping import ClipStrategy, NoClip, PPOClip, WeightClip
from .kl import kl_k1, kl_k2, kl_k3
from .logprobs import token_logprobs
from .objective import PolicyObjective, clip_metrics, masked_mean
from .presets import build_component, build_objective, build_preset, preset_names, preset_spec
from .ratios import ProductRatio, RatioScheme, SequenceRatio, SequenceTokenRatio, TokenRatio
from .registry import ADVANTAGES, AGGREGATIONS, CLIPPING, KL_ESTIMATORS, RATIOS, Registry

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "CLIPPING", "KL_ESTIMATORS", "RATIOS",
    "AdvantageEstimator", "Aggregation", "ClipStrategy", "DiscountedReturn", "GroupBaseline",
    "GroupContrast", "NoClip", "PPOClip", "PolicyObjective", "ProductRatio", "RatioScheme",
    "Registry", "SeqMeanTokenMean", "SeqMeanTokenSum", "SeqMeanTokenSumNorm", "SequenceRatio",
    "SequenceTokenRatio", "TokenMean", "TokenRatio", "WeightClip", "build_component",
    "build_objective", "build_preset", "clip_metrics", "kl_k1", "kl_k2", "kl_k3", "masked_mean", "preset_names", "preset_spec",
    "token_logprobs",
]
