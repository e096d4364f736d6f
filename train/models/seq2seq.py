"""Padded-sequence models built from fast-transformers' builders.

* `Seq2SeqTransformer`: a source encoder (TransformerEncoderBuilder, non-causal attention, the
  source padding given as a LengthMask) and a target decoder (TransformerDecoderBuilder: causal
  self-attention under a TriangularCausalMask, cross attention to the encoded source under the
  source LengthMask). `model.recurrent()` is its O(1)-per-token decoding twin: the same
  weights loaded strictly into a RecurrentDecoderBuilder decoder.
* `SequenceClassifier`: an encoder whose outputs are mean-pooled over the real tokens only.

Padding is always at the end of a row, so real positions keep their position encodings, and
the length masks keep padded keys out of every attention.
"""

from __future__ import annotations

import torch
from torch import nn

from fast_transformers.builders import (RecurrentDecoderBuilder, TransformerDecoderBuilder,
                                        TransformerEncoderBuilder)
from .attention import NAME as CHUNKED
from .attention_types import ATTENTION_TYPES
from .generation import pick_tokens
from .masks import PaddingMask, causal_mask, full_mask, no_padding_mask
from .sequence import FP32Attention, sinusoidal_positions


def _layer_kwargs(d_model: int, n_heads: int, d_ff: int, dropout: float) -> dict:
    head = d_model // n_heads
    return dict(n_heads=n_heads, query_dimensions=head, value_dimensions=head,
                feed_forward_dimensions=d_ff, activation="gelu", dropout=dropout,
                attention_dropout=dropout)


class _Embedding(nn.Module):
    """Token embedding + sinusoidal position of each token."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + sinusoidal_positions(positions, self.tokens.embedding_dim)


class Seq2SeqTransformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 128, n_encoder_layers: int = 2,
                 n_decoder_layers: int = 2, n_heads: int = 4, d_ff: int = 512,
                 dropout: float = 0.0, encoder_attention_type: str = "linear",
                 self_attention_type: str = CHUNKED, cross_attention_type: str = "linear",
                 attention_chunk_size: int = 64):
        super().__init__()
        self.hparams = dict(vocab_size=vocab_size, d_model=d_model,
                            n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers,
                            n_heads=n_heads, d_ff=d_ff, dropout=dropout,
                            encoder_attention_type=encoder_attention_type,
                            self_attention_type=self_attention_type,
                            cross_attention_type=cross_attention_type,
                            attention_chunk_size=attention_chunk_size)
        layer = _layer_kwargs(d_model, n_heads, d_ff, dropout)
        self.embed = _Embedding(vocab_size, d_model)  # shared by source and target
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            n_layers=n_encoder_layers, attention_type=encoder_attention_type, **layer).get()
        self_attention = ATTENTION_TYPES[self_attention_type]
        self.decoder = TransformerDecoderBuilder.from_kwargs(
            **self._decoder_kwargs(), **self_attention.builder_kwargs(self.hparams)).get()
        self.head = nn.Linear(d_model, vocab_size)
        if self_attention.fp32_only:
            for dec_layer in self.decoder.layers:
                dec_layer.self_attention.inner_attention = FP32Attention(
                    dec_layer.self_attention.inner_attention)

    def _decoder_kwargs(self) -> dict:
        h = self.hparams
        return dict(n_layers=h["n_decoder_layers"], self_attention_type=h["self_attention_type"],
                    cross_attention_type=h["cross_attention_type"],
                    **_layer_kwargs(h["d_model"], h["n_heads"], h["d_ff"], h["dropout"]))

    def encode(self, source: torch.Tensor, source_lengths: torch.Tensor):
        """(N, S) padded source ids, (N,) lengths -> memory (N, S, E) and its LengthMask."""
        length = source.shape[1]
        mask = PaddingMask(source_lengths, length)
        x = self.embed(source, torch.arange(length, device=source.device))
        return self.encoder(x, attn_mask=full_mask(length, length, source.device),
                            length_mask=mask), mask

    def forward(self, source, source_lengths, target_in) -> torch.Tensor:
        """Teacher forcing: logits (N, T, V) for target_in = [BOS, y1, ..., y_{T-1}]. Target
        padding needs no mask: it sits after every real position, which cannot see it."""
        memory, memory_mask = self.encode(source, source_lengths)
        (n, length), device = target_in.shape, target_in.device
        x = self.embed(target_in, torch.arange(length, device=device))
        h = self.decoder(x, memory, x_mask=causal_mask(length, device),
                         x_length_mask=no_padding_mask(n, length, device),
                         memory_mask=full_mask(length, memory.shape[1], device),
                         memory_length_mask=memory_mask)
        return self.head(h)

    def recurrent(self) -> "RecurrentSeq2Seq":
        return RecurrentSeq2Seq(self).to(self.head.weight.device).eval()


class RecurrentSeq2Seq(nn.Module):
    """The decoding twin: the parallel encoder, and a RecurrentDecoderBuilder decoder holding the
    same weights (loaded with strict=True). Each decoding step costs the same at any position."""

    def __init__(self, parallel: Seq2SeqTransformer):
        super().__init__()
        h = parallel.hparams
        self.embed = _Embedding(h["vocab_size"], h["d_model"])
        self.encoder = parallel.encoder  # the source is encoded once, in parallel
        self.decoder = RecurrentDecoderBuilder.from_kwargs(**parallel._decoder_kwargs()).get()
        self.head = nn.Linear(h["d_model"], h["vocab_size"])
        self.load_state_dict(parallel.state_dict(), strict=True)

    encode = Seq2SeqTransformer.encode  # same modules under the same names

    def step(self, tokens: torch.Tensor, position: int, memory, memory_mask, state=None):
        """tokens (N,) at target position `position` -> logits (N, V), new state."""
        x = self.embed(tokens, torch.full_like(tokens, position))
        h, state = self.decoder(x, memory, memory_length_mask=memory_mask, state=state)
        return self.head(h), state

    @torch.no_grad()
    def decode(self, source, source_lengths, bos_id: int, eos_id: int, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """Batched decoding; each row stops at its own EOS (excluded from the result).
        temperature 0 = greedy, otherwise sampling (optionally from the top-k tokens)."""
        memory, memory_mask = self.encode(source, source_lengths)
        n = source.shape[0]
        tokens = torch.full((n,), bos_id, dtype=torch.long, device=source.device)
        done = torch.zeros(n, dtype=torch.bool, device=source.device)
        out, state = [], None
        for position in range(max_new_tokens):
            logits, state = self.step(tokens, position, memory, memory_mask, state)
            tokens = pick_tokens(logits, temperature, top_k, generator)
            tokens = tokens.masked_fill(done, eos_id)
            out.append(tokens)
            done |= tokens == eos_id
            if bool(done.all()):
                break
        rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(n)]
        return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


class SequenceClassifier(nn.Module):
    """Encoder + mean of the real tokens' outputs + linear head. The pooled vector is a masked
    mean over the LengthMask, so the padding's content never reaches the logits."""

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, d_ff: int = 512, dropout: float = 0.0,
                 attention_type: str = "linear"):
        super().__init__()
        self.embed = _Embedding(vocab_size, d_model)
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            n_layers=n_layers, attention_type=attention_type,
            **_layer_kwargs(d_model, n_heads, d_ff, dropout)).get()
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        mask = PaddingMask(lengths, length)
        x = self.embed(ids, torch.arange(length, device=ids.device))
        h = self.encoder(x, attn_mask=full_mask(length, length, ids.device), length_mask=mask)
        keep = mask.float_matrix.to(h.dtype).unsqueeze(-1)  # (N, L, 1): 1 real, 0 padding
        pooled = (h * keep).sum(1) / lengths.clamp(min=1).unsqueeze(-1).to(h.dtype)
        return self.head(pooled)
