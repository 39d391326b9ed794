"""Pure-tensor policy-optimisation math (no Lightning): advantages, ratios, clipping,
aggregation, KL, behaviour corrections (sampler mu vs pi_old), token masks, the composed objective,
chunked log-probs and named presets.

    from rlopt.algorithms import GroupBaseline, PolicyObjective, PPOClip
    adv = GroupBaseline()(rewards, mask, group_size=4)                       # [N, T]
    obj = PolicyObjective(ratio="sequence", clip=PPOClip(3e-4, 4e-4), aggregation="seq_mean_token_mean")
    loss, metrics = obj(logp, old_logp, adv, mask)
"""

from .advantage_variants import GDPO, GPG, OPO, MaxRL, PassK, ReinforcePP, ReinforcePPBaseline, RewardNorm
from .advantages import AdvantageEstimator, DiscountedReturn, GroupBaseline, GroupContrast
from .aggregation import (
    Aggregation, LUSPOAggregation, PromptMean, SeqMeanTokenMean, SeqMeanTokenSum, SeqMeanTokenSumNorm, TokenMean,
    TokenSum,
)
from .behaviour import (
    BehaviourCorrection, Bypass, DecoupledPPO, MaskedIS, NoCorrection, RejectionSampling, TruncatedIS,
)
from .clipping import ClipStrategy, NoClip, PPOClip, WeightClip
from .trust_regions import (
    DPPOKLClip, DPPOTVClip, GMPOClip, Kimi15Loss, PolicyGradient, SAPOClip, TOPRClip, VESPOClip, WeightAbsClip,
)
from .kl import kl_k1, kl_k2, kl_k3, kl_k3_plus
from .logprobs import token_logprobs
from .masks import (
    ClipCovMask, HighEntropyMask, KLCovPenalty, M2POMask, MaskInputs, MaskResult, OPSMMask, TokenMask,
    TruncatedMask, build_masks,
)
from .objective import PolicyObjective, RolloutWeights, clip_metrics, masked_mean
from .presets import build_component, build_objective, build_preset, preset_names, preset_spec
from .ratios import ProductRatio, RatioScheme, SequenceRatio, SequenceTokenRatio, TokenRatio
from .regularisers import AdaptiveEntropyCoef, mix_reference_
from .registry import ADVANTAGES, AGGREGATIONS, CLIPPING, CORRECTIONS, KL_ESTIMATORS, MASKS, RATIOS, Registry

__all__ = [
    "AdaptiveEntropyCoef", "DPPOKLClip", "DPPOTVClip", "GDPO", "GMPOClip", "GPG", "Kimi15Loss", "LUSPOAggregation",
    "MaxRL", "OPO", "PassK", "PolicyGradient", "PromptMean", "ReinforcePP", "ReinforcePPBaseline", "RewardNorm",
    "SAPOClip", "TOPRClip", "TokenSum", "VESPOClip", "WeightAbsClip", "mix_reference_",
    "ADVANTAGES", "AGGREGATIONS", "CLIPPING", "CORRECTIONS", "KL_ESTIMATORS", "MASKS", "RATIOS",
    "BehaviourCorrection", "Bypass", "ClipCovMask", "DecoupledPPO", "HighEntropyMask", "KLCovPenalty",
    "M2POMask", "MaskInputs", "MaskResult", "MaskedIS", "NoCorrection", "OPSMMask", "RejectionSampling",
    "RolloutWeights", "TokenMask", "TruncatedIS", "TruncatedMask", "build_masks", "kl_k3_plus",
    "AdvantageEstimator", "Aggregation", "ClipStrategy", "DiscountedReturn", "GroupBaseline",
    "GroupContrast", "NoClip", "PPOClip", "PolicyObjective", "ProductRatio", "RatioScheme",
    "Registry", "SeqMeanTokenMean", "SeqMeanTokenSum", "SeqMeanTokenSumNorm", "SequenceRatio",
    "SequenceTokenRatio", "TokenMean", "TokenRatio", "WeightClip", "build_component",
    "build_objective", "build_preset", "clip_metrics", "kl_k1", "kl_k2", "kl_k3", "masked_mean", "preset_names", "preset_spec",
    "token_logprobs",
]
