"""Causal language modelling on byte-tokenized text."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from train.data.text import IGNORE_INDEX, lm_datasets
from train.data.tokenizer import ByteTokenizer
from train.models.sequence import (attention_flops_per_token, build_sequence_model,
                                  weight_flops_per_token)


class LanguageModelingTask:
    collate_fn = None
    length_grouping = None

    def __init__(self, config):
        self.config = config
        self.tokenizer = ByteTokenizer()
        self.context_length = config.data.block_size  # positions the model is trained on

    def datasets(self):
        d = self.config.data
        return lm_datasets(d.source, d.text_column, d.block_size, d.val_fraction, self.tokenizer)

    def model(self):
        return build_sequence_model(self.config.model, self.tokenizer.vocab_size)

    def flops_per_sample(self, model) -> float:
        """From the architecture (weights + attention per token, see the helpers' notes);
        causal-linear attention is O(L d^2), not softmax's O(L^2 d). Training = 3x forward."""
        m, length = self.config.model, self.config.data.block_size
        per_token = weight_flops_per_token(model)
        if m.arch == "transformer":
            per_token += m.n_layers * attention_flops_per_token(m.attention_type, length,
                                                                m.d_model, m.n_heads)
        return 3 * per_token * length

    def _nll(self, model, batch, reduction: str, label_smoothing: float = 0.0):
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction=reduction,
                               label_smoothing=label_smoothing)
        return loss, (labels != IGNORE_INDEX).sum()

    def loss(self, model, batch):
        loss, tokens = self._nll(model, batch, "mean", self.config.lm.label_smoothing)
        return loss, {"tokens": tokens}

    def eval_sums(self, model, batch):
        nll, tokens = self._nll(model, batch, "sum")
        return {"nll": nll, "tokens": tokens}

    def eval_metrics(self, sums):
        loss = sums["nll"] / max(sums["tokens"], 1)
        # One token is one byte, so nats/token / ln 2 = bits per byte.
        return {"val/loss": loss, "val/bpb": loss / math.log(2), "val/tokens": sums["tokens"]}

    def eval_extras(self, model, step):
        lm = self.config.lm
        if lm.sample_tokens == 0:
            return {}
        from train.generate import sample

        generator = torch.Generator().manual_seed(self.config.seed + step)
        text = sample(model, self.tokenizer, [lm.sample_prompt], lm.sample_tokens,
                      lm.sample_temperature, lm.sample_top_k, generator, self.context_length)[0]
        return {"sample": text}
