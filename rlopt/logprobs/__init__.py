"""Completion log-probs under a model (completion.py) and the shared-prompt forward they use
(shared_prompt.py).

    from rlopt.logprobs import CompletionLogProbs
    logp, entropy = CompletionLogProbs(temperature=1.0)(model, completions, with_entropy=True)
"""

from .completion import CompletionLogProbs, by_length, trim_padding
from .shared_prompt import PromptPlan, completion_states, prompt_plan, shared_prompt_forward, supports_shared_prompt

__all__ = ["CompletionLogProbs", "PromptPlan", "by_length", "completion_states", "prompt_plan",
           "shared_prompt_forward", "supports_shared_prompt", "trim_padding"]
