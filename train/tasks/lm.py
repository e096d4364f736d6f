"""Causal language modelling: a corpus of any size (train.data.corpus), byte or BPE tokens, a
fast-transformers model with its recurrent twin for sampling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch.nn import functional as F

from train.config import CausalAttention, EncoderConfig, LoaderConfig, RunConfig, Section
from train.data import IGNORE_INDEX
from train.data.corpus import load_tokenizer, prepare
from train.data.tokenizer import bpe_vocab_size
from train.errors import ConfigError
from train.models.attention_types import STATE_DECAYS, attention_flops, check_state_decay
from train.models.generation import sample
from train.models.sequence import build_sequence_model, weight_flops_per_token
from train.tasks import register_task


class TextDataConfig(LoaderConfig):
    # `builtin:pydoc_topics` (Python's pydoc topics, 466 KB), `builtin:python_stdlib` (the
    # running Python's standard library sources, ~30 MB), a local file, directory or glob
    # (text of any extension, read as bytes; .jsonl/.json/.parquet/.csv rows; .gz/.zst
    # compressed), or a Hugging Face hub dataset name.
    source: str = "builtin:pydoc_topics"
    text_column: str = Field("text", description="the text of structured files and hub rows")
    # `byte`, the path of a tokenizer.json, or `bpe:VOCAB` (trained in the run).
    tokenizer: str = "byte"
    tokenizer_sample_mb: int = Field(64, ge=1, description="text a bpe:VOCAB tokenizer learns from")
    block_size: int = Field(128, ge=2)
    val_fraction: float = Field(0.05, gt=0, lt=1, description="for sources without a val split")
    cache_dir: str | None = Field(None, description="token stores; None: $TRAIN_CACHE or "
                                                    "~/.cache/train")
    # Read, tokenize and pack on the fly in the loader workers (corpora bigger than the disk).
    streaming: bool = False

    @field_validator("tokenizer")
    @classmethod
    def _bpe_size(cls, name: str) -> str:
        try:
            bpe_vocab_size(name)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[1]) from None
        return name


class SequenceModelConfig(EncoderConfig):
    arch: Literal["transformer", "lstm"] = "transformer"
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    d_ff: int = Field(1024, ge=1)
    attention_type: CausalAttention = "chunked-causal-linear"
    attention_chunk_size: int = Field(64, ge=1)
    # The recipe (see TransformerLM): where each block normalises, whether the output head
    # shares the embedding matrix, and how weights start.
    norm: Literal["pre", "post"] = "post"
    tie_embeddings: bool = False
    init: Literal["gpt2", "default"] = "default"
    # Keys and values mix in the previous position's input (TokenShift).
    token_shift: bool = False
    # Each feed-forward mixes in the previous position's input too (its own TokenShift), the
    # mix starting at feed_forward_shift_start (0: the model without it). From 0.5, byte-token
    # models learned much faster, but the demo's BPE model stalled at its unigram loss.
    feed_forward_shift: bool = False
    feed_forward_shift_start: float = Field(0.0, ge=0, le=1)
    # Each head's attention state forgets at its own rate (chunked-causal-linear only; see
    # train.models.attention.state_decay_rates).
    attention_decay: Literal[STATE_DECAYS] = "none"
    # Recompute each layer's activations in the backward instead of keeping them: long
    # contexts fit in memory for about a third more compute.
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _decay_needs_an_attention_that_takes_it(self):
        check_state_decay(self.attention_decay, self.attention_type)
        return self

    @model_validator(mode="after")
    def _shift_start_needs_the_shift(self):
        if self.feed_forward_shift_start and not self.feed_forward_shift:
            raise ValueError(f"feed_forward_shift_start={self.feed_forward_shift_start} has no "
                             "effect without feed_forward_shift=true; set both, or neither")
        return self


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
        # None for a bpe:VOCAB not trained yet: datasets() trains it.
        self.tokenizer = load_tokenizer(config.data.tokenizer, run_dir=Path(config.output_dir))
        self.context_length = config.data.block_size  # positions the model is trained on
        self.tokens_per_byte = 1.0
        self.run_files: dict[str, Path] = {}  # copied into the run directory and checkpoints

    def datasets(self):
        corpus, self.tokenizer = prepare(self.config.data, self.tokenizer,
                                         self.config.progress_bar)
        self.tokens_per_byte = corpus.val_tokens / max(corpus.val_bytes, 1)
        if hasattr(self.tokenizer, "path") and self.config.data.tokenizer.startswith("bpe:"):
            self.run_files["tokenizer.json"] = self.tokenizer.path
        return corpus.train, corpus.val

    def model(self):
        if self.tokenizer is None:
            raise RuntimeError("call datasets() first: the BPE vocabulary is learned from the data")
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
        # Bits per byte of the original text, whatever the tokenizer: nats per token times the
        # validation split's tokens per byte, over ln 2.
        return {"val/loss": loss, "val/bpb": loss * self.tokens_per_byte / math.log(2),
                "val/tokens": sums["tokens"]}

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
