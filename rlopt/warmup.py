"""Supervised warm-up: a few steps of next-token training on ``prompt + answer + EOS``.

    supervised_warmup(model, tokenizer, rows, steps=60, lr=3e-3, batch_size=32)

Only the answer tokens are trained. Used to teach a randomly initialised tiny model the answer
format before RL, so that RL's effect is visible within minutes on a CPU.
"""

from __future__ import annotations

import random
from typing import Any

import torch


def supervised_warmup(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], steps: int,
                      lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> list[float]:
    if steps <= 0:
        return []
    if any("answer" not in r for r in rows[:1]):
        raise ValueError("supervised warm-up needs an 'answer' column in the task rows")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    pad = tokenizer.pad_token_id
    for _ in range(steps):
        batch = rng.sample(rows, min(batch_size, len(rows)))
        seqs, labels = [], []
        for r in batch:
            p = tokenizer(r["prompt"])["input_ids"]
            a = tokenizer(str(r["answer"]))["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=attn, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
