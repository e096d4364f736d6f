"""Causal language modelling on byte-tokenized text."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from train.config import CausalAttention, EncoderConfig, LoaderConfig, RunConfig, Section
from train.data.text import IGNORE_INDEX, lm_datasets
from train.data.tokenizer import ByteTokenizer
from train.models.attention_types import attention_flops
from train.models.generation import sample
from train.models.sequence import build_sequence_model, weight_flops_per_token
from train.tasks import register_task


class TextDataConfig(LoaderConfig):
    # `builtin:pydoc_topics` (text shipped with Python), a local file or directory
    # (.txt/.json/.jsonl/.parquet/.csv), or a Hugging Face hub dataset name.
    source: str = "builtin:pydoc_topics"
    text_column: str = "text"
    block_size: int = Field(128, ge=2)
    val_fraction: float = Field(0.05, gt=0, lt=1)


class SequenceModelConfig(EncoderConfig):
    arch: Literal["transformer", "lstm"] = "transformer"
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    d_ff: int = Field(1024, ge=1)
    attention_type: CausalAttention = "chunked-causal-linear"
    attention_chunk_size: int = Field(64, ge=1)


class LMTaskConfig(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    sample_prompt: str = "The "
    sample_tokens: int = Field(200, ge=0, description="tokens sampled at each eval; 0 disables")
    sample_temperature: float = Field(0.8, gt=0)
    sample_top_k: int = Field(40, ge=0)


class LMConfig(RunConfig):
    data: TextDataConfig = TextDataConfig()
    model: SequenceModelConfig = SequenceModelConfig()
    lm: LMTaskConfig = LMTaskConfig()


@register_task("lm", LMConfig)
class LanguageModelingTask:
    collate_fn = None
    length_grouping = None
    generate_input = "prompt"

    def __init__(self, config: LMConfig):
        self.config = config
        self.tokenizer = ByteTokenizer()
        self.context_length = config.data.block_size  # positions the model is trained on

    def datasets(self):
        d = self.config.data
        return lm_datasets(d.source, d.text_column, d.block_size, d.val_fraction, self.tokenizer)

    def model(self):
        return build_sequence_model(self.config.model, self.tokenizer.vocab_size)

    def flops_per_sample(self, model) -> float | None:
        """From the architecture: 2 per matmul weight per token, plus each attention layer's
        own cost (see train.models.attention_types); training = 3x forward."""
        m, length = self.config.model, self.config.data.block_size
        total = weight_flops_per_token(model) * length
        if m.arch == "transformer":
            attention = attention_flops(m.attention_type, length, length, m.d_model, m.n_heads)
            if attention is None:
                return None
            total += m.n_layers * attention
        return 3 * total

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
        generator = torch.Generator().manual_seed(self.config.seed + step)
        text = sample(model, self.tokenizer, [lm.sample_prompt], lm.sample_tokens,
                      lm.sample_temperature, lm.sample_top_k, generator, self.context_length)[0]
        return {"sample": text}

    def generate(self, model, inputs, max_new_tokens, temperature, top_k, generator):
        """Continue each prompt (default: 200 tokens at temperature 1)."""
        return sample(model, self.tokenizer, inputs, max_new_tokens or 200, temperature or 1.0,
                      top_k, generator, self.context_length)
