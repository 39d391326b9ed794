"""Rollout engines: prompts in, ``Completions`` out. One module per ``configs/rollout/<name>.yaml``.

    from rlopt.rollout import KVCacheSampler, HFGenerate, Completions
"""

from .base import BehaviourCopy, Completions, RolloutEngine, completion_mask_from
from .hf_generate import HFGenerate
from .lean import KVCacheSampler, warp_logits

__all__ = ["BehaviourCopy", "Completions", "HFGenerate", "KVCacheSampler", "RolloutEngine", "completion_mask_from", "warp_logits"]
