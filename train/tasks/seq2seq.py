"""Sequence to sequence: a fast-transformers encoder-decoder trained with teacher forcing and
evaluated by decoding with its recurrent twin (exact match of whole outputs)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from train.config import (CausalAttention, CrossAttention, EncoderAttention, EncoderConfig,
                          PaddedDataConfig, RunConfig, Section)
from train.data.padded import PadPairs, pair_datasets, sample_lengths
from train.data import IGNORE_INDEX
from train.data.tokenizer import build_tokenizer
from train.errors import ConfigError
from train.models.attention_types import attention_flops
from train.models.seq2seq import Seq2SeqTransformer
from train.models.sequence import weight_flops_per_token
from train.tasks import register_task


class PairDataConfig(PaddedDataConfig):
    # `builtin:sort` / `builtin:reverse` (lowercase strings) / `builtin:add` ("12+345" -> "357"),
    # made on the fly; a local .jsonl/.json/.csv/.parquet file or directory; or a hub dataset.
    source: str = "builtin:sort"
    source_column: str = "source"
    target_column: str = "target"
    max_source_length: int = Field(256, ge=1, description="tokens; longer sources are cut")
    max_target_length: int = Field(256, ge=2, description="tokens incl. EOS; also the decode cap")


class Seq2SeqModelConfig(EncoderConfig):
    n_encoder_layers: int = Field(2, ge=1)
    n_decoder_layers: int = Field(2, ge=1)
    encoder_attention_type: EncoderAttention = "linear"  # over the source, bidirectional
    self_attention_type: CausalAttention = "chunked-causal-linear"  # decoder, with a recurrent form
    cross_attention_type: CrossAttention = "linear"  # decoder to source, with a recurrent form
    attention_chunk_size: int = Field(64, ge=1)


class Seq2SeqTaskConfig(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    decode_examples: int = Field(8, ge=0, description="decoded val examples logged as a table")


class Seq2SeqConfig(RunConfig):
    data: PairDataConfig = PairDataConfig()
    model: Seq2SeqModelConfig = Seq2SeqModelConfig()
    seq2seq: Seq2SeqTaskConfig = Seq2SeqTaskConfig()


@register_task("seq2seq", Seq2SeqConfig)
class Seq2SeqTask:
    generate_input = "source"

    def __init__(self, config):
        self.config = config
        self.tokenizer = build_tokenizer(config.data.tokenizer)
        self.collate_fn = PadPairs(self.tokenizer.pad_id, self.tokenizer.bos_id,
                                   self.tokenizer.eos_id)
        self.length_grouping = None
        self.val_set = None
        self.mean_lengths = (0.0, 0.0)  # source, target (+ EOS) tokens per training sample

    def datasets(self):
        d = self.config.data
        train, self.val_set = pair_datasets(d, self.tokenizer, self.config.seed)
        sources, targets = (sample_lengths(train, c) for c in ("source_ids", "target_ids"))
        self.length_grouping = ([s + t for s, t in zip(sources, targets)], d.length_window)
        self.mean_lengths = (sum(sources) / len(sources), sum(targets) / len(targets) + 1)
        return train, self.val_set

    def model(self):
        m = self.config.model
        return Seq2SeqTransformer(
            self.tokenizer.vocab_size, m.d_model, m.n_encoder_layers, m.n_decoder_layers,
            m.n_heads, m.d_ff, m.dropout, m.encoder_attention_type, m.self_attention_type,
            m.cross_attention_type, m.attention_chunk_size)

    def flops_per_sample(self, model) -> float | None:
        """From the architecture, at the training set's mean lengths; training = 3x forward."""
        m, (src, tgt) = self.config.model, self.mean_lengths
        attention = [attention_flops(m.encoder_attention_type, src, src, m.d_model, m.n_heads),
                     attention_flops(m.self_attention_type, tgt, tgt, m.d_model, m.n_heads),
                     attention_flops(m.cross_attention_type, tgt, src, m.d_model, m.n_heads)]
        if None in attention:
            return None
        encoder, self_attention, cross = attention
        weights = (src * weight_flops_per_token(model, ("embed", "decoder", "head"))
                   + tgt * weight_flops_per_token(model, ("embed", "encoder")))
        return 3 * (weights + m.n_encoder_layers * encoder
                    + m.n_decoder_layers * (self_attention + cross))

    def _nll(self, model, batch, reduction: str, label_smoothing: float = 0.0):
        logits = model(batch["source"], batch["source_lengths"], batch["target_in"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction=reduction,
                               label_smoothing=label_smoothing)
        return loss, logits, labels != IGNORE_INDEX

    def loss(self, model, batch):
        loss, _, real = self._nll(model, batch, "mean", self.config.seq2seq.label_smoothing)
        return loss, {"tokens": real.sum(), "source_tokens": batch["source_lengths"].sum()}

    def eval_sums(self, model, batch):
        nll, logits, real = self._nll(model, batch, "sum")
        labels = batch["labels"]
        targets = [row[row != IGNORE_INDEX][:-1].tolist() for row in labels]  # without EOS
        decoded = model.recurrent().decode(
            batch["source"], batch["source_lengths"], self.tokenizer.bos_id,
            self.tokenizer.eos_id, max_new_tokens=labels.shape[1])
        exact = sum(d == t for d, t in zip(decoded, targets))
        count = torch.tensor(len(targets), device=labels.device)
        return {"nll": nll, "tokens": real.sum(),
                "correct_tokens": ((logits.argmax(-1) == labels) & real).sum(),
                "exact": torch.tensor(exact, device=labels.device), "count": count}

    def eval_metrics(self, sums):
        tokens, count = max(sums["tokens"], 1), max(sums["count"], 1)
        return {"val/loss": sums["nll"] / tokens, "val/token_accuracy": sums["correct_tokens"] / tokens,
                "val/exact_match": sums["exact"] / count, "val/count": int(sums["count"])}

    @torch.no_grad()
    def eval_extras(self, model, step):
        n = min(self.config.seq2seq.decode_examples, len(self.val_set))
        if n == 0:
            return {}
        rows = [self.val_set[i] for i in range(n)]
        sources = [self.tokenizer.decode(r["source_ids"]) for r in rows]
        targets = [self.tokenizer.decode(r["target_ids"]) for r in rows]
        decoded = self.generate(model, sources, None, None, 0, None)
        extras = {"decoded": " | ".join(f"{s} -> {d}" for s, d in zip(sources[:3], decoded))}
        if self.config.wandb.mode != "disabled":
            import wandb

            table = wandb.Table(columns=["step", "source", "target", "decoded", "exact"],
                                data=[[step, s, t, d, d == t]
                                      for s, t, d in zip(sources, targets, decoded)])
            extras["val/decoded_examples"] = table
        return extras

    @torch.no_grad()
    def generate(self, model, inputs, max_new_tokens, temperature, top_k, generator):
        """Decode source texts in one batch: greedy unless a temperature is given; at most
        data.max_target_length tokens unless max_new_tokens is given."""
        ids = [self.tokenizer.encode(s)[: self.config.data.max_source_length] for s in inputs]
        if not all(ids):
            raise ConfigError("every source text needs at least one token")
        batch = self.collate_fn([{"source_ids": x, "target_ids": []} for x in ids])
        device = next(model.parameters()).device
        model.eval()
        decoded = model.recurrent().decode(
            batch["source"].to(device), batch["source_lengths"].to(device), self.tokenizer.bos_id,
            self.tokenizer.eos_id, max_new_tokens or self.config.data.max_target_length,
            temperature or 0.0, top_k, generator)
        return [self.tokenizer.decode(row) for row in decoded]
