"""The embedded default model: a tiny Llama-architecture causal LM and a character tokenizer,
built from a config (no download), saved to a folder and reloaded with ``from_pretrained``.

    path = build_tiny("runs/tiny")            # writes config, random weights and tokenizer
    model = AutoModelForCausalLM.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)

The tokenizer (made with the ``tokenizers`` library) has one token per character of
``ALPHABET`` plus ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .ranks import rank_world

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = string.digits + string.ascii_lowercase + " +-*/=:?.,()<>#|"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def build_tiny(path: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int = 256, max_positions: int = 128, seed: int = 0) -> str:
    """Create (or reuse) the tiny model folder at ``path`` and return it.

    Several processes may build the same folder at once (DDP / FSDP ranks; ``path`` should be on a
    shared file system across nodes): it is written to a temporary folder and renamed into place,
    so none reads a half-written one. Inside an initialised process group only rank 0 writes
    (transformers' ``save_pretrained`` writes weights on rank 0 only) and the others wait for it."""
    rank, world = rank_world()
    if world > 1:
        if rank == 0:
            _build_tiny(path, hidden_size, num_layers, num_heads, intermediate_size, max_positions, seed)
        torch.distributed.barrier()
        return path
    return _build_tiny(path, hidden_size, num_layers, num_heads, intermediate_size, max_positions, seed)


def _build_tiny(path: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                max_positions: int, seed: int) -> str:
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, max_position_embeddings=max_positions,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first (path exists, not empty): keep its folder
            if not os.path.exists(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
