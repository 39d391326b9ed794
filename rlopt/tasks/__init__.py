"""Procedurally generated tasks with verifiable answers.

    task = ReverseTask(alphabet="abcde", min_len=3, max_len=5)
    rows = task.rows("train", 1000, seed=0)     # [{"prompt": "abc>", "answer": "cba"}, ...]

Train and test splits are disjoint: a problem belongs to the test split when a hash of its
prompt falls in the first ``test_percent`` of 100 buckets, whatever the seed.

The suite (``SUITE``: config name under ``configs/task/`` -> class; ``docs/tasks.md``): six
tasks for the tiny character model, each with a difficulty knob (``task.knob``), a dense and a
sparse exact-match reward (``task.dense_reward``, ``task.sparse_reward``) and a prompt-blind
bound (``task.prompt_blind_bound("dense" | "sparse")``, argued in each class's docstring):
reverse, sort, copy past a distractor, multi-digit addition, a small Countdown and key-value
recall. ``ArithmeticTask``, ``AdditionTask`` and ``CountdownTask`` are the older numeric tasks
(the last two worded for instruct models).
"""

from .arithmetic import AdditionTask, ArithmeticTask, DigitAdditionTask
from .base import ProceduralTask, enumerate_outcomes
from .countdown import (
    CountdownTask, MiniCountdownTask, countdown_closeness, countdown_exact, countdown_value, expression_values,
)
from .strings import CopyTask, KeyValueTask, ReverseTask, SortTask

SUITE = {
    "reverse": ReverseTask,
    "sort": SortTask,
    "copy_distractor": CopyTask,
    "addition_digits": DigitAdditionTask,
    "countdown_mini": MiniCountdownTask,
    "kv_recall": KeyValueTask,
}

__all__ = [
    "SUITE", "AdditionTask", "ArithmeticTask", "CopyTask", "CountdownTask", "DigitAdditionTask", "KeyValueTask",
    "MiniCountdownTask", "ProceduralTask", "ReverseTask", "SortTask", "countdown_closeness", "countdown_exact",
    "countdown_value", "enumerate_outcomes", "expression_values",
]
