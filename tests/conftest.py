"""Shared fixtures for the config / training / reward tests (lightning-hydra-template style).

Tests compose the real ``configs/train.yaml`` with ``hydra.compose`` and shrink it with the
``debug=default`` preset. ``tests/`` is a package (``tests/__init__.py``), so pytest imports this
file as ``tests.conftest`` with the repository root on ``sys.path``: configs can then reference
the helpers below by import path, e.g. ``+task.rewards.bad={_target_: tests.conftest.reward_nan,
_partial_: true}`` or ``+callbacks.probe={_target_: tests.conftest.Probe}``.
"""

from __future__ import annotations

import math
import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs a network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's matrices are far too small to gain from intra-op threads, and on a loaded
# 2-core box spinning OpenMP workers made a 2-step debug run ~5x slower (fit 6 s instead of 1.2 s;
# each rollout 1 s instead of 0.01 s, measured here). One thread in-process and in subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from typing import Any, Callable  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import rlopt.conf  # noqa: E402,F401 - registers the rlopt_run_name resolver
from rlopt.tiny import build_tiny  # noqa: E402
from rlopt.train import CONFIG_DIR  # noqa: E402

torch.set_num_threads(1)

# Defaults for a quiet, fast test run; a test's own override of the same key wins.
QUIET = ("debug=default", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false", "export_dir=null")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose_train(output_dir: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                  base: tuple[str, ...] = QUIET, run_name: str | None = "test") -> DictConfig:
    """Compose ``train.yaml`` like ``rlopt-train <overrides>`` would, with the Hydra config set
    (so ``${hydra:...}`` interpolations resolve) and ``output_dir`` pointing at a temp folder."""
    overrides = list(overrides)
    mine = {_key(o) for o in overrides}
    extra = [f"output_dir={output_dir}"] + ([f"run_name={run_name}"] if run_name is not None else [])
    args = [o for o in (*base, *extra) if _key(o) not in mine] + overrides
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=args, return_hydra_config=True)
    with open_dict(cfg):  # @hydra.main sets the run folder; compose leaves it missing
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    return cfg


def fit(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> tuple[Any, Any, L.Trainer]:
    """``rlopt.train.build`` + ``trainer.fit`` (like ``run`` without printing / exporting)."""
    from rlopt.train import build

    module, dm, trainer = build(cfg)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    return module, dm, trainer


def logged(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.logged_metrics.items()}


@pytest.fixture
def compose_cfg(tmp_path) -> Callable[..., DictConfig]:
    """``compose_cfg("algorithm=gspo", "ratio=token")`` -> a composed debug config writing to tmp."""

    def _compose(*overrides: str, base: tuple[str, ...] = QUIET, run_name: str | None = "test",
                 output_dir: str | os.PathLike | None = None) -> DictConfig:
        return compose_train(output_dir or tmp_path / "run", overrides, base=base, run_name=run_name)

    return _compose


def warmed_tiny_llama(**config) -> tuple[Any, Any]:
    """The tiny Llama (rlopt.tiny's tokenizer; ``config`` overrides the LlamaConfig fields) after 25
    steps of supervised warm-up on the reverse task, so sampled rows end with EOS at different
    steps; in eval mode. Returns ``(model, tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlopt.tasks import ReverseTask
    from rlopt.tiny import build_tokenizer
    from rlopt.warmup import supervised_warmup

    tok = build_tokenizer()
    fields = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**fields, **config}))
        supervised_warmup(model, tok, ReverseTask().rows("train", 200), steps=25, seed=0)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The embedded tiny model saved once per session (config, weights, tokenizer)."""
    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "tiny_model"))


@pytest.fixture
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail loudly (pre-flight checks must fail before it)."""
    import rlopt.models

    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("load_policy was called: the config should have been rejected before any model load")

    monkeypatch.setattr(rlopt.models, "load_policy", refuse)
    return calls


# --- reward functions referenced from configs by import path ----------------------------------

def reward_hash(prompts, completions, **kwargs) -> list[float]:
    """A deterministic, completion-dependent reward in [0, 1): completions of a group differ, so
    the advantages (and gradients) are non-zero even for an untrained model."""
    return [(sum(map(ord, c)) * 2654435761 % 1000) / 1000.0 for c in completions]


def reward_wrong_length(prompts, completions, **kwargs) -> list[float]:
    return [0.0] * (len(completions) + 1)


def reward_nan(prompts, completions, **kwargs) -> list[float]:
    return [math.nan] * len(completions)


def reward_nan_every_other(prompts, completions, **kwargs) -> list[float]:
    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]


def reward_raises(prompts, completions, **kwargs) -> list[float]:
    raise KeyError("no such column")


def reward_non_numeric(prompts, completions, **kwargs) -> list[Any]:
    return ["great"] * len(completions)


class Probe(L.Callback):
    """Records the step and policy weights at the start and end of fit; ``Probe.last`` is the
    most recently constructed probe (so a test can read one instantiated from a config)."""

    last: "Probe | None" = None

    def __init__(self) -> None:
        Probe.last = self
        self.start_step = self.end_step = self.device = None
        self.start_state: dict[str, torch.Tensor] = {}
        self.end_state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        self.device = pl_module.device
        self.start_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.end_step = trainer.global_step
        self.end_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
