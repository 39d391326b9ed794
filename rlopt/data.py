"""Prompt data: procedural tasks or Hugging Face ``datasets`` files, as a LightningDataModule.

    dm = PromptDataModule(train=TaskSource(ReverseTask(), size=20000),
                          val=TaskSource(ReverseTask(), split="test", size=128), batch_size=16)

Each batch is a dict of lists: ``prompt`` plus every other column (passed to reward functions).
``FileSource`` loads local jsonl / parquet / csv (or a hub name where a network exists) with
``datasets.load_dataset``; ``prompt_column`` is renamed to ``prompt``. With ``chat_template=True``
and a tokenizer, each prompt is wrapped as a user message with the tokenizer's chat template.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .ranks import rank_world
from .tasks import ProceduralTask


class TaskSource:
    """Rows from a procedural task's split."""

    def __init__(self, task: ProceduralTask, size: int, split: str = "train", seed: int = 0) -> None:
        self.task, self.size, self.split, self.seed = task, int(size), split, seed

    def load(self) -> list[dict[str, Any]]:
        return self.task.rows(self.split, self.size, self.seed)


class FileSource:
    """Rows from ``datasets.load_dataset``: a local file (json/jsonl/parquet/csv) or a hub name."""

    _BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

    def __init__(self, path: str, split: str = "train", prompt_column: str = "prompt",
                 limit: int | None = None, columns: dict[str, str] | None = None) -> None:
        self.path, self.split, self.prompt_column, self.limit = path, split, prompt_column, limit
        self.columns = dict(columns or {})

    def load(self) -> list[dict[str, Any]]:
        import datasets

        ext = os.path.splitext(self.path)[1].lower()
        if ext in self._BUILDERS:
            if not os.path.exists(self.path):
                raise ValueError(f"data file {self.path!r} does not exist")
            ds = datasets.load_dataset(self._BUILDERS[ext], data_files=self.path, split="train")
        else:
            ds = datasets.load_dataset(self.path, split=self.split)
        renames = {**self.columns, self.prompt_column: "prompt"}
        for old, new in renames.items():
            if old not in ds.column_names:
                raise ValueError(f"data set {self.path!r} has no column {old!r} (columns: {ds.column_names}); "
                                 "set prompt_column / columns to name it")
            if old != new:
                ds = ds.rename_column(old, new)
        if self.limit is not None:
            ds = ds.select(range(min(self.limit, len(ds))))
        return [dict(r) for r in ds]


class RowsDataset(Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            raise ValueError("the prompt data set is empty")
        if "prompt" not in rows[0]:
            raise ValueError(f"rows need a 'prompt' column; got columns {sorted(rows[0])}")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded indices whose order depends only on ``(seed, epoch)``.

    ``skip_batches`` drops the first batches of the first epoch iterated after a resume, so a
    resumed run sees exactly the prompts an uninterrupted run would. Each rank takes every
    ``world``-th index of the permutation (the dealing rule that ``ranks.minibatch_plan`` relies on);
    ``drop_last`` keeps batch counts equal on all ranks.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_epoch(self) -> int:
        return self.size // rank_world()[1] // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def __iter__(self):
        rank, world = rank_world()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.size)
        mine = order[rank::world][: len(self)].tolist()
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        return iter(mine[start:])


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in rows[0]}


class PromptDataModule(L.LightningDataModule):
    """Batches of prompts (``batch_size`` prompts per rollout step; each is sampled G times), in a
    seeded shuffled order each epoch, or in the source's own order with ``shuffle=False``
    (``data.shuffle``: a curriculum, or another framework fed the same prompts step by step)."""

    def __init__(self, train: Any, val: Any | None = None, batch_size: int = 16, val_batch_size: int | None = None,
                 seed: int = 0, tokenizer: Any = None, chat_template: bool = False, system_prompt: str | None = None,
                 shuffle: bool = True) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.train_source, self.val_source = train, val
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.seed, self.tokenizer, self.shuffle = seed, tokenizer, bool(shuffle)
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.train_rows: list[dict[str, Any]] | None = None
        self.val_rows: list[dict[str, Any]] | None = None

    def _format(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.chat_template:
            return rows
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("data.chat_template=true needs a tokenizer with a chat template")
        out = []
        for r in rows:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": r["prompt"]})
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            out.append({**r, "prompt": text, "question": r["prompt"]})
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is None:
            self.train_rows = self._format(self.train_source.load())
            RowsDataset(self.train_rows)
        if self.val_rows is None and self.val_source is not None:
            self.val_rows = self._format(self.val_source.load())

    def train_dataloader(self) -> DataLoader:
        """Batch ``k`` of the run is a function of ``(seed, k)`` only: on resume the sampler skips
        the batches already consumed (``trainer.global_step`` counts them: one per rollout)."""
        sampler = ResumableSampler(len(self.train_rows), self.batch_size, seed=self.seed, shuffle=self.shuffle)
        if sampler.batches_per_epoch() < 1:
            raise ValueError(f"the training set ({len(self.train_rows)} prompts) is smaller than one batch "
                             f"(data.batch_size={self.batch_size} per rank)")
        done = self.trainer.global_step if self.trainer is not None else 0
        sampler.set_epoch(done // sampler.batches_per_epoch())
        sampler.skip_batches = done % sampler.batches_per_epoch()
        return DataLoader(RowsDataset(self.train_rows), batch_size=self.batch_size, sampler=sampler,
                          collate_fn=collate_rows, drop_last=True)

    def batch_at(self, k: int) -> dict[str, list[Any]]:
        """Batch ``k`` of the run on this rank, the one ``train_dataloader`` yields as its ``k``-th
        (the asynchronous rollout worker samples it one step ahead: rollout/pipeline.py)."""
        sampler = ResumableSampler(len(self.train_rows), self.batch_size, seed=self.seed, shuffle=self.shuffle)
        sampler.set_epoch(k // sampler.batches_per_epoch())
        sampler.skip_batches = k % sampler.batches_per_epoch()
        idx = list(iter(sampler))[: self.batch_size]
        return collate_rows([self.train_rows[i] for i in idx])

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return DataLoader(RowsDataset(self.val_rows), batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=collate_rows)


def check_prompts_fit(dm: Any, tokenizer: Any, limit: int | None, max_new_tokens: int) -> None:
    """Raise ``ValueError`` naming the prompt unless every prompt of the data module's train and
    val rows fits the model's context ``limit`` with the generation budget (checked before any work)."""
    if dm is None or limit is None:
        return
    for split in ("train_rows", "val_rows"):
        rows = getattr(dm, split, None) or []
        if not rows:
            continue
        lens = [len(x) for x in tokenizer([r["prompt"] for r in rows])["input_ids"]]
        i = max(range(len(lens)), key=lens.__getitem__)
        if lens[i] + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} of the {split.split('_')[0]} set is {lens[i]} tokens; with rollout.max_new_tokens="
                f"{max_new_tokens} it exceeds the model's context of {limit} tokens "
                f"(prompt: {rows[i]['prompt'][:80]!r}...). Shorten the prompts or lower rollout.max_new_tokens")
