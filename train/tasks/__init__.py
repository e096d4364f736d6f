"""Task families plug into the one training loop through this small interface.

The loop knows nothing about text or images; a task knows nothing about devices, ranks or
precision. Adding a task = one module here + its config schema in `train.config`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


class Task(Protocol):
    collate_fn: Any  # passed to the DataLoaders; None = torch's default collate
    # (length of each training sample, window) for length-grouped batches that cut padding;
    # None = a plain shuffle. Set by datasets().
    length_grouping: tuple[list[int], int] | None

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, validation). Called on the main process first, so caches are built once."""

    def model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean training loss of a batch, plus counters summed by the loop for throughput
        (e.g. {"tokens": ...}). Counters stay tensors: the loop reads them only when it logs."""

    def flops_per_sample(self, model: nn.Module) -> float:
        """Training FLOPs (forward + backward) of one sample, for MFU."""

    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """Per-batch sums (e.g. summed loss and counts); the loop adds them over batches and
        ranks, so the result is exact whatever the sharding."""

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn the global sums into metrics (e.g. mean loss, bits per byte)."""

    def eval_extras(self, model: nn.Module, step: int) -> dict[str, Any]:
        """Things for people to look at (a text sample, an image grid), main process only."""


def build_task(config) -> Task:
    if config.task == "lm":
        from train.tasks.lm import LanguageModelingTask

        return LanguageModelingTask(config)
    if config.task == "classify":
        from train.tasks.classify import ImageClassificationTask

        return ImageClassificationTask(config)
    if config.task == "seq2seq":
        from train.tasks.seq2seq import Seq2SeqTask

        return Seq2SeqTask(config)
    if config.task == "text_classify":
        from train.tasks.text_classify import TextClassificationTask

        return TextClassificationTask(config)
    raise ValueError(f"unknown task {config.task!r}")
