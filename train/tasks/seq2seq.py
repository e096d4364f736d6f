"""Sequence to sequence: a fast-transformers encoder-decoder trained with teacher forcing and
evaluated by decoding with its recurrent twin (exact match of whole outputs)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from train.config import ConfigError
from train.data.padded import PadPairs, pair_datasets, sample_lengths
from train.data.text import IGNORE_INDEX
from train.data.tokenizer import build_tokenizer
from train.models.seq2seq import Seq2SeqTransformer
from train.models.sequence import attention_flops_per_token, weight_flops_per_token


class Seq2SeqTask:
    def __init__(self, config):
        self.config = config
        self.tokenizer = build_tokenizer(config.data.tokenizer, specials=True)
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

    def flops_per_sample(self, model) -> float:
        """From the architecture, at the training set's mean lengths; training = 3x forward.
        Cross attention: linear costs d_model * d_head per source and per target token
        (building and reading the key-value state), full costs source_length * d_model per
        target token, for scores and for the weighted sum."""
        m, (src, tgt) = self.config.model, self.mean_lengths
        head = m.d_model // m.n_heads
        encoder = src * (weight_flops_per_token(model, ("embed", "decoder", "head"))
                         + m.n_encoder_layers * attention_flops_per_token(
                             m.encoder_attention_type, src, m.d_model, m.n_heads))
        decoder = tgt * (weight_flops_per_token(model, ("embed", "encoder"))
                         + m.n_decoder_layers * attention_flops_per_token(
                             m.self_attention_type, tgt, m.d_model, m.n_heads))
        if m.cross_attention_type == "full":
            cross = tgt * 2 * 2 * src * m.d_model
        else:
            cross = (src + tgt) * 2 * m.d_model * head
        return 3 * (encoder + decoder + m.n_decoder_layers * cross)

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
        decoded = decode_texts(self, model, sources, self.config.data.max_target_length)
        extras = {"decoded": " | ".join(f"{s} -> {d}" for s, d in zip(sources[:3], decoded))}
        if self.config.wandb.mode != "disabled":
            import wandb

            table = wandb.Table(columns=["step", "source", "target", "decoded", "exact"],
                                data=[[step, s, t, d, d == t]
                                      for s, t, d in zip(sources, targets, decoded)])
            extras["val/decoded_examples"] = table
        return extras


@torch.no_grad()
def decode_texts(task: Seq2SeqTask, model, sources: list[str], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> list[str]:
    """Texts in, decoded texts out (greedy at temperature 0), in one batch."""
    collate = task.collate_fn
    ids = [task.tokenizer.encode(s)[: task.config.data.max_source_length] for s in sources]
    if not all(ids):
        raise ConfigError("every source text needs at least one token")
    batch = collate([{"source_ids": x, "target_ids": []} for x in ids])
    device = next(model.parameters()).device
    model.eval()
    decoded = model.recurrent().decode(
        batch["source"].to(device), batch["source_lengths"].to(device), collate.bos_id,
        collate.eos_id, max_new_tokens, temperature, top_k, generator)
    return [task.tokenizer.decode(row) for row in decoded]
