"""Sequence classification: a fast-transformers encoder over padded texts, mean-pooled over the
real tokens (LengthMask), then a linear head. Metrics: accuracy and macro-F1 from a confusion
matrix summed over ranks, so they are exact whatever the sharding."""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from train.config import EncoderAttention, EncoderConfig, PaddedDataConfig, RunConfig
from train.data.padded import PadTexts, labelled_text_datasets, sample_lengths
from train.data.tokenizer import build_tokenizer
from train.errors import ConfigError
from train.models.attention_types import attention_flops
from train.models.seq2seq import SequenceClassifier
from train.models.sequence import weight_flops_per_token
from train.tasks import register_task


class LabelledTextDataConfig(PaddedDataConfig):
    # `builtin:majority` (which of a/b/c occurs most in a string), a local file or directory,
    # or a hub dataset with a text and a label column (integer, ClassLabel or string labels).
    source: str = "builtin:majority"
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(512, ge=1, description="tokens; longer texts are cut")


class TextClassifierConfig(EncoderConfig):
    n_layers: int = Field(2, ge=1)
    attention_type: EncoderAttention = "linear"
    num_classes: int | None = Field(None, ge=2, description="None: the classes found in the data")


class TextClassifyConfig(RunConfig):
    data: LabelledTextDataConfig = LabelledTextDataConfig()
    model: TextClassifierConfig = TextClassifierConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register_task("text_classify", TextClassifyConfig)
class TextClassificationTask:
    def __init__(self, config):
        self.config = config
        self.tokenizer = build_tokenizer(config.data.tokenizer)
        self.collate_fn = PadTexts(self.tokenizer.pad_id)
        self.length_grouping = None
        self.num_classes = config.model.num_classes
        self.classes: list[str] = []
        self.mean_length = 0.0

    def datasets(self):
        d = self.config.data
        train, val, self.classes = labelled_text_datasets(d, self.tokenizer, self.config.seed)
        if self.num_classes is None:
            self.num_classes = len(self.classes)
        elif len(self.classes) > self.num_classes:
            raise ConfigError(f"model.num_classes={self.num_classes} but the data has "
                              f"{len(self.classes)} classes")
        lengths = sample_lengths(train, "ids")
        self.length_grouping = (lengths, d.length_window)
        self.mean_length = sum(lengths) / len(lengths)
        return train, val

    def model(self):
        if self.num_classes is None:
            raise RuntimeError("call datasets() first: the number of classes comes from the data")
        m = self.config.model
        return SequenceClassifier(self.tokenizer.vocab_size, self.num_classes, m.d_model,
                                  m.n_layers, m.n_heads, m.d_ff, m.dropout, m.attention_type)

    def flops_per_sample(self, model) -> float | None:
        """From the architecture at the training set's mean length; training = 3x forward."""
        m, length = self.config.model, self.mean_length
        attention = attention_flops(m.attention_type, length, length, m.d_model, m.n_heads)
        if attention is None:
            return None
        return 3 * (weight_flops_per_token(model) * length + m.n_layers * attention)

    def loss(self, model, batch):
        logits = model(batch["ids"], batch["lengths"]).float()
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.config.label_smoothing)
        return loss, {"tokens": batch["lengths"].sum()}

    def eval_sums(self, model, batch):
        logits = model(batch["ids"], batch["lengths"]).float()
        labels, k = batch["labels"], self.num_classes
        predictions = logits.argmax(dim=1)
        confusion = torch.bincount(labels * k + predictions, minlength=k * k).view(k, k)
        return {"loss": F.cross_entropy(logits, labels, reduction="sum"),
                "confusion": confusion}  # rows: true class, columns: predicted class

    def eval_metrics(self, sums):
        confusion = torch.tensor(sums["confusion"])
        count = confusion.sum().item()
        hits = confusion.diag()
        predicted, actual = confusion.sum(0), confusion.sum(1)
        # Macro-F1 over the classes that occur in the labels or the predictions.
        seen = (predicted + actual) > 0
        f1 = 2 * hits[seen] / (predicted[seen] + actual[seen])
        return {"val/loss": sums["loss"] / max(count, 1),
                "val/accuracy": hits.sum().item() / max(count, 1),
                "val/macro_f1": f1.mean().item() if seen.any() else 0.0, "val/count": int(count)}

    def eval_extras(self, model, step):
        return {}
