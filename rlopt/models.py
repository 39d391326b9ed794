"""Loading the policy: the embedded tiny model, a local folder or a hub id.

    model, tokenizer = load_policy("tiny", tiny_dir="runs/x/tiny_model")
    model, tokenizer = load_policy("/models/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .tiny import build_tiny

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(name_or_path: str, tiny_dir: str | None = None, dtype: str = "float32",
                trust_remote_code: bool = False, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer)``. ``"tiny"`` builds the embedded default into ``tiny_dir``
    and reloads it from there with ``from_pretrained`` (the same path as any local model)."""
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not valid; valid choices: {', '.join(_DTYPES)}")
    if name_or_path == "tiny":
        if not tiny_dir:
            raise ValueError("model.tiny_dir must be set to build the tiny model")
        name_or_path = build_tiny(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code, **kwargs)
    return model, tokenizer


def decoder_layer_classes(model: torch.nn.Module | None = None) -> set[type]:
    """The transformer-block classes of the known decoder families (FSDP auto-wrap targets)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    classes = {LlamaDecoderLayer, Qwen2DecoderLayer}
    if model is not None:
        classes |= {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return classes
