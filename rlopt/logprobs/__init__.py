"""Completion log-probs under a model (completion.py) and the forwards that share a prompt among
its completions: packed rows (packed.py) and a shared KV cache (shared_prompt.py).

    from rlopt.logprobs import CompletionLogProbs
    logp, entropy = CompletionLogProbs(temperature=1.0)(model, completions, with_entropy=True)
"""

from .completion import CompletionLogProbs, by_length, trim_padding
from .packed import PackLayout, pack_layout, packed_forward, supports_packing
from .shared_prompt import PromptPlan, completion_states, prompt_plan, shared_prompt_forward, supports_shared_prompt

__all__ = ["CompletionLogProbs", "PackLayout", "PromptPlan", "by_length", "completion_states", "pack_layout",
           "packed_forward", "prompt_plan", "shared_prompt_forward", "supports_packing", "supports_shared_prompt",
           "trim_padding"]
