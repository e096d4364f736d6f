"""Sequence models: a fast-transformers causal LM with its recurrent twin, and an LSTM baseline.

Every language model here offers two views of the same weights:
* `model(input_ids) -> logits` over a whole sequence (training, evaluation);
* `model.recurrent()` -> a stepper with `step(tokens, position, state) -> (logits, state)`
  that costs O(1) per token (sampling).
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from fast_transformers import transformers as library_layers
from fast_transformers.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder
from fast_transformers.masking import FullMask, LengthMask
from fast_transformers.recurrent import transformers as library_recurrent_layers
from . import attention  # noqa: F401  (registers chunked-causal-linear)
from .attention_types import ATTENTION_TYPES, check_state_decay
from .masks import causal_mask, no_padding_mask


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., ) integer positions -> (..., dim) fixed sinusoidal encodings. No parameters, so any
    position works, and the recurrent twin can encode the true position of each step."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float().unsqueeze(-1) * freqs
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(enc, (0, dim - 2 * half))


class FP32Attention(nn.Module):
    """Runs an inner attention in fp32 with autocast off (for the library's fp32-only
    causal-linear kernel under AMP)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        with torch.autocast(queries.device.type, enabled=False):
            out = self.inner(queries.float(), keys.float(), values.float(), attn_mask,
                             query_lengths, key_lengths)
        return out.to(values.dtype)


def _shift_mix(h: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """lerp(h, h one position earlier (zeros first), mix) along dim 1, with no shifted copy."""
    out = h * (1 - mix)
    out[:, 1:].addcmul_(h[:, :-1], mix)
    return out


def _linear_grads(grad: torch.Tensor, x: torch.Tensor, has_bias: bool):
    """Weight and bias gradients of a linear layer from its output gradient and input,
    both flattened to (rows, features)."""
    return grad.t() @ x, (grad.sum(0, dtype=torch.float32) if has_bias else None)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _linear_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute x @ weight.T in: autocast's where it is on."""
    device = x.device.type
    return (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
            else torch.promote_types(x.dtype, weight.dtype))


class _ShiftMixProject(torch.autograd.Function):
    """Linear projections of m = _shift_mix(h, mix), keeping h (which the layer keeps anyway)
    for the backward instead of m, and recomputing m there (one elementwise pass): 4 bytes per
    channel and position less, and no shifted copy of h made. `params` are the projections'
    weights and biases, (w1, b1, w2, b2, ...), a bias None where there is none. Runs in
    `dtype` (the autocast dtype, where autocast is on), like the linear layers would."""

    @staticmethod
    def forward(ctx, h, mix, dtype, *params):
        weights, biases = params[0::2], params[1::2]
        with torch.autocast(h.device.type, enabled=False):
            mixed = _shift_mix(h, mix).to(dtype)
            outs = tuple(nn.functional.linear(mixed, w.to(dtype), _cast(b, dtype))
                         for w, b in zip(weights, biases))
        ctx.save_for_backward(h, mix, *weights)
        ctx.dtype, ctx.biases = dtype, tuple(b is not None for b in biases)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        h, mix, *weights = ctx.saved_tensors
        dtype = ctx.dtype
        param_grads = []
        with torch.autocast(h.device.type, enabled=False):
            mixed = _shift_mix(h, mix).to(dtype).flatten(0, -2)
            grads = [g.to(dtype).flatten(0, -2) for g in grads]
            grad_mixed = None
            for g, w, has_bias in zip(grads, weights, ctx.biases):
                grad_w, grad_b = _linear_grads(g, mixed, has_bias)
                param_grads += [grad_w.to(w.dtype), _cast(grad_b, w.dtype)]
                grad_mixed = (g @ w.to(dtype) if grad_mixed is None
                              else grad_mixed.addmm_(g, w.to(dtype)))
            del mixed
            g = grad_mixed.view(h.shape).to(torch.promote_types(h.dtype, mix.dtype))
            # Through the mix, in g itself and one scratch tensor: output j reads h[j] with
            # weight 1 - mix and h[j - 1] with weight mix.
            scratch = torch.sub(g[:, 1:], g[:, :-1]).mul_(h[:, :-1])
            grad_mix = scratch.sum((0, 1), dtype=torch.float32)
            grad_mix -= (g[:, -1] * h[:, -1]).sum(0, dtype=torch.float32)
            torch.mul(g[:, 1:], mix, out=scratch)
            grad_h = g.mul_(1 - mix)
            grad_h[:, :-1] += scratch
        return (grad_h.to(h.dtype), grad_mix.to(mix.dtype), None, *param_grads)


# Rows of the feed-forward's hidden activation made at a time by _GeluProject on CPU: 256 x
# d_ff 1024 x 4 B = 1 MiB, one cache-sized temporary reused block after block. Made whole (16 MiB
# per layer at 4096 tokens), those temporaries left holes in glibc's heap that raised the peak
# anonymous memory of a 1024-token run by 30-50 MiB (measured), at no gain in speed.
FEED_FORWARD_ROWS = 256


class _GeluProject(torch.autograd.Function):
    """linear(gelu(u)) keeping only u (which gelu's backward needs anyway) and the weight:
    gelu(u) is recomputed in the backward instead of kept, one activation of the feed-forward
    width per position less (a quarter of a layer's saved activations), for one elementwise
    pass. Runs in `dtype` (the autocast dtype, where autocast is on), like nn.Linear would."""

    @staticmethod
    def forward(ctx, u, dtype, weight, bias):
        rows = u.flatten(0, -2)
        with torch.autocast(u.device.type, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype)
            out = rows.new_empty(rows.shape[0], w.shape[0], dtype=dtype)
            for block in _row_blocks(rows):
                torch.addmm(b, nn.functional.gelu(rows[block]).to(dtype), w.t(), out=out[block])
        ctx.save_for_backward(u, weight)
        ctx.dtype = dtype
        return out.view(*u.shape[:-1], w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        u, weight = ctx.saved_tensors
        rows = u.flatten(0, -2)
        with torch.autocast(u.device.type, enabled=False):
            grad = grad.to(ctx.dtype).flatten(0, -2)
            w = weight.to(ctx.dtype)
            grad_weight = torch.zeros_like(w)
            grad_u = torch.empty_like(rows)
            for block in _row_blocks(rows):
                g = grad[block]
                grad_weight.addmm_(g.t(), nn.functional.gelu(rows[block]).to(ctx.dtype))
                torch.ops.aten.gelu_backward.grad_input((g @ w).to(u.dtype), rows[block],
                                                        grad_input=grad_u[block])
            grad_bias = grad.sum(0, dtype=torch.float32)
        return grad_u.view(u.shape), None, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def _row_blocks(rows: torch.Tensor) -> list[slice]:
    """Blocks of FEED_FORWARD_ROWS rows on CPU; one block on GPUs and under torch.compile
    (where whole-tensor kernels are what is fast)."""
    n = rows.shape[0]
    step = (FEED_FORWARD_ROWS if rows.device.type == "cpu" and not torch.compiler.is_compiling()
            else max(n, 1))
    return [slice(r, r + step) for r in range(0, n, step)]


class TokenShift(nn.Module):
    """A learned per-channel mix of this position's input and the previous position's (RWKV's
    token shift, a one-step causal convolution), starting at `mix`. Keys and values read one:
    linear attention sums the past with no sense of order; this gives each key its local
    context, which the model otherwise has to learn through the position encodings. The
    feed-forward can read one too (RWKV's channel mix): every layer then sees pairs of
    neighbouring positions. The recurrent form keeps the previous input: still O(1) per token."""

    def __init__(self, d_model: int, mix: float = 0.5):
        super().__init__()
        self.mix = nn.Parameter(torch.full((d_model,), mix))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N, L, E) -> (N, L, E); position 0 mixes with zeros."""
        return _shift_mix(h, self.mix)

    def project(self, h: torch.Tensor, *projections: nn.Linear) -> tuple[torch.Tensor, ...]:
        """Each projection of forward(h), without keeping forward(h) for the backward."""
        params = [t for p in projections for t in (p.weight, p.bias)]
        return _ShiftMixProject.apply(h, self.mix, _linear_dtype(h, projections[0].weight),
                                      *params)

    def step(self, h: torch.Tensor, previous: torch.Tensor | None):
        """h: (N, E) at one position, `previous` the input before it -> (mixed, new previous)."""
        mixed = h * (1 - self.mix)
        return mixed if previous is None else mixed.addcmul_(previous, self.mix), h


class _RecipeOptions:
    """What the parallel and recurrent layers below share: the `norm_first`, `token_shift` and
    `feed_forward_shift` switches and the feed-forward half of a block in either order."""

    def __init__(self, attention, d_model, d_ff, dropout, activation, norm_first: bool):
        super().__init__(attention, d_model, d_ff, dropout, activation)
        self.norm_first = norm_first
        self.token_shift: TokenShift | None = None
        self.feed_forward_shift: TokenShift | None = None

    def _feed_forward(self, x, previous=None):
        """x: the residual stream after attention, (N, L, E); or (N, E) at one position in the
        recurrent twin, which passes the feed-forward's input one position earlier (None at the
        first). -> (output, this position's feed-forward input for the next step)."""
        if self.norm_first:
            out, previous = self._mlp(self.norm2(x), previous)
            return x + self.dropout(out), previous
        x = self.norm1(x)  # the library's post-norm order
        out, previous = self._mlp(x, previous)
        return self.norm2(x + self.dropout(out)), previous

    def _mlp(self, x, previous):
        """linear2(dropout(gelu(linear1(x)))), x first mixed with the previous position's by
        `feed_forward_shift` where it is on; without dropout, through _GeluProject."""
        shift = self.feed_forward_shift
        if shift is None:
            u = self.linear1(x)
        elif x.dim() == 2:  # one position: the recurrent twin keeps the previous one
            mixed, previous = shift.step(x, previous)
            u = self.linear1(mixed)
        else:
            (u,) = shift.project(x, self.linear1)
        if self.activation is not nn.functional.gelu or (self.dropout.p and self.training):
            return self.linear2(self.dropout(self.activation(u))), previous
        return _GeluProject.apply(u, _linear_dtype(u, self.linear2.weight), self.linear2.weight,
                                  self.linear2.bias), previous


class TransformerEncoderLayer(_RecipeOptions, library_layers.TransformerEncoderLayer):
    """The library's encoder layer (same parameters, same names, same class name, so FSDP's
    wrap-by-layer-class configs apply), optionally normalising before each sub-block instead of
    after it (pre-norm, GPT-2's order): the residual stream then passes through unnormalised up
    to the encoder's final LayerNorm. With `token_shift`, keys and values see TokenShift. The
    feed-forward half keeps less for the backward than the library's (see _GeluProject); with
    `feed_forward_shift` it reads its own TokenShift of its input (RWKV's channel mix)."""

    def forward(self, x, attn_mask=None, length_mask=None):
        # The library's defaults for absent masks.
        attn_mask = attn_mask or FullMask(x.shape[1], device=x.device)
        length_mask = length_mask or LengthMask(x.new_full(x.shape[:1], x.shape[1],
                                                           dtype=torch.int64))
        h = self.norm1(x) if self.norm_first else x
        if self.token_shift is None:
            out = self.attention(h, h, h, attn_mask=attn_mask, query_lengths=length_mask,
                                 key_lengths=length_mask)
        else:
            out = self._shifted_attention(h, attn_mask, length_mask)
        return self._feed_forward(x + self.dropout(out))[0]

    def _shifted_attention(self, h, attn_mask, length_mask):
        """The library's AttentionLayer.forward, with keys and values from TokenShift."""
        a, (n, length, _) = self.attention, h.shape
        queries = a.query_projection(h).view(n, length, a.n_heads, -1)
        keys, values = self.token_shift.project(h, a.key_projection, a.value_projection)
        out = a.inner_attention(queries, keys.view(n, length, a.n_heads, -1),
                                values.view(n, length, a.n_heads, -1), attn_mask, length_mask,
                                length_mask)
        return a.out_projection(out.view(n, length, -1))


class RecurrentTransformerEncoderLayer(_RecipeOptions,
                                       library_recurrent_layers.RecurrentTransformerEncoderLayer):
    """The recurrent twin of TransformerEncoderLayer: one position at a time, same order. With
    either shift its state is (attention state, previous input, previous feed-forward input)."""

    def forward(self, x, state=None, memory=None):
        shifts = self.token_shift is not None or self.feed_forward_shift is not None
        if not self.norm_first and not shifts:
            return super().forward(x, state, memory)
        attention_state, previous, ff_previous = (state or (None,) * 3) if shifts else (
            state, None, None)
        h = self.norm1(x) if self.norm_first else x
        if self.token_shift is None:
            out, attention_state = self.attention(h, h, h, attention_state)
        else:
            kv, previous = self.token_shift.step(h, previous)
            out, attention_state = self.attention(h, kv, kv, attention_state)
        x, ff_previous = self._feed_forward(x + self.dropout(out), ff_previous)
        return x, ((attention_state, previous, ff_previous) if shifts else attention_state)


def _own_layers(encoder: nn.Module, layer_class: type, hparams: dict) -> nn.Module:
    """Rebuild the builder's layers as `layer_class` around the attention modules the builder
    made (from fast-transformers' registries), keeping every parameter name and value, and
    drawing nothing from the random generator (a post-norm model is the library's, bit for bit)."""
    layers = []
    for layer in encoder.layers:
        with torch.device("meta"):  # no second initialisation: the builder's weights are kept
            own = layer_class(layer.attention, hparams["d_model"], hparams["d_ff"],
                              hparams["dropout"], "gelu", norm_first=hparams["norm"] == "pre")
        own.load_state_dict(layer.state_dict(), assign=True)
        if hparams["token_shift"]:  # not the builder's: made here, off the meta device
            own.token_shift = TokenShift(hparams["d_model"])
        if hparams["feed_forward_shift"]:
            own.feed_forward_shift = TokenShift(hparams["d_model"],
                                                mix=hparams["feed_forward_shift_start"])
        layers.append(own)
    encoder.layers = nn.ModuleList(layers)
    return encoder


GPT2_STD = 0.02


def gpt2_init(model: nn.Module, n_layers: int) -> None:
    """GPT-2's initialisation: matmul and embedding weights ~ N(0, 0.02), biases 0, and the
    projections that write into the residual stream scaled by 1/sqrt(2 n_layers), so that
    the stream's variance does not grow with depth."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith(("out_projection", "linear2"))
            std = GPT2_STD / math.sqrt(2 * n_layers) if residual else GPT2_STD
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def _position_scale(init: str) -> float:
    """Unit-amplitude position encodings would drown token embeddings drawn with GPT-2's
    std of 0.02 (the model then learns little but byte frequencies for its first hundred
    steps): under that initialisation they are added at the embeddings' scale."""
    return GPT2_STD if init == "gpt2" else 1.0


class TransformerLM(nn.Module):
    """Token embedding + sinusoidal positions + fast-transformers encoder (causal mask) + head.

    Recipe options: `norm` "pre" (GPT-2 order) or "post" (the library's); `tie_embeddings`
    (the head reuses the embedding matrix, no head bias); `init` "gpt2" or "default" (PyTorch's
    per-layer defaults); `token_shift` (TokenShift before keys and values);
    `feed_forward_shift` (TokenShift before each feed-forward, its mix starting at
    `feed_forward_shift_start`); `attention_decay` (chunked-causal-linear's state forgets, per
    head: see attention.state_decay_rates)."""

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                 d_ff: int = 1024, dropout: float = 0.0,
                 attention_type: str = "chunked-causal-linear", attention_chunk_size: int = 64,
                 norm: str = "post", tie_embeddings: bool = False, init: str = "default",
                 token_shift: bool = False, attention_decay: str = "none",
                 feed_forward_shift: bool = False, feed_forward_shift_start: float = 0.0):
        super().__init__()
        self.hparams = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                            n_heads=n_heads, d_ff=d_ff, dropout=dropout,
                            attention_type=attention_type,
                            attention_chunk_size=attention_chunk_size, norm=norm,
                            tie_embeddings=tie_embeddings, init=init, token_shift=token_shift,
                            feed_forward_shift=feed_forward_shift,
                            feed_forward_shift_start=feed_forward_shift_start,
                            attention_decay=check_state_decay(attention_decay,
                                                              attention_type))
        self.embed = nn.Embedding(vocab_size, d_model)
        self.encoder = _own_layers(TransformerEncoderBuilder.from_kwargs(
            **self._builder_kwargs(), **self._parallel_only_kwargs()).get(),
            TransformerEncoderLayer, self.hparams)
        self.head = _head(self.embed, tie_embeddings)
        self.position_scale = _position_scale(init)
        if init == "gpt2":
            gpt2_init(self, n_layers)
        if ATTENTION_TYPES[attention_type].fp32_only:
            for layer in self.encoder.layers:
                layer.attention.inner_attention = FP32Attention(layer.attention.inner_attention)

    def _builder_kwargs(self) -> dict:
        h = self.hparams
        head_dim = h["d_model"] // h["n_heads"]
        return dict(n_layers=h["n_layers"], n_heads=h["n_heads"], query_dimensions=head_dim,
                    value_dimensions=head_dim, feed_forward_dimensions=h["d_ff"],
                    activation="gelu", dropout=h["dropout"], attention_dropout=h["dropout"],
                    attention_type=h["attention_type"],
                    **ATTENTION_TYPES[h["attention_type"]].twin_builder_kwargs(h))

    def _parallel_only_kwargs(self) -> dict:
        return ATTENTION_TYPES[self.hparams["attention_type"]].builder_kwargs(self.hparams)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids) + self.position_scale * sinusoidal_positions(
            positions, self.embed.embedding_dim)
        # Masks made without reading the device (the library's would, in every forward).
        device = input_ids.device
        return self.head(self.encoder(x, attn_mask=causal_mask(length, device),
                                      length_mask=no_padding_mask(n, length, device)))

    def recurrent(self) -> "RecurrentTransformerLM":
        """The O(1)-per-token twin, built by RecurrentEncoderBuilder and loaded strictly from
        this model's weights (on this model's device)."""
        twin = RecurrentTransformerLM(self)
        device = self.embed.weight.device
        return twin.to(device).eval()


def _head(embed: nn.Embedding, tied: bool) -> nn.Linear:
    vocab_size, d_model = embed.weight.shape
    head = nn.Linear(d_model, vocab_size, bias=not tied)
    if tied:
        head.weight = embed.weight
    return head


class RecurrentTransformerLM(nn.Module):
    def __init__(self, parallel: TransformerLM):
        super().__init__()
        h = parallel.hparams
        self.embed = nn.Embedding(h["vocab_size"], h["d_model"])
        self.encoder = _own_layers(RecurrentEncoderBuilder.from_kwargs(
            **parallel._builder_kwargs()).get(), RecurrentTransformerEncoderLayer, h)
        self.head = _head(self.embed, h["tie_embeddings"])
        self.position_scale = parallel.position_scale
        # Same parameter names by construction (the fp32 wrapper holds no tensors).
        self.load_state_dict(parallel.state_dict(), strict=True)

    def step(self, tokens: torch.Tensor, position: int, state=None):
        """tokens: (N,) at sequence position `position` -> logits (N, V), new state."""
        pos = torch.full_like(tokens, position)
        x = self.embed(tokens) + self.position_scale * sinusoidal_positions(
            pos, self.embed.embedding_dim)
        h, state = self.encoder(x, state=state)
        return self.head(h), state


def weight_flops_per_token(model: nn.Module, skip: tuple[str, ...] = ("embed",)) -> int:
    """2 FLOPs per matmul weight per token (multiply + add), over the parameters whose names do
    not start with `skip`. Embedding lookups are not matmuls; a head tied to the embedding is
    (hence every name of a shared tensor is looked at)."""
    return 2 * sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False)
                   if p.ndim >= 2 and not name.startswith(skip))


class LSTMLM(nn.Module):
    """Embedding + LSTM + linear head: the recurrent baseline, trained by the same task/loop."""

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.hparams = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                            dropout=dropout)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True,
                            dropout=dropout if n_layers > 1 else 0.0)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(input_ids))
        return self.head(out)

    def recurrent(self) -> "LSTMLM":
        return self.eval()

    def step(self, tokens: torch.Tensor, position: int, state=None):
        out, state = self.lstm(self.embed(tokens).unsqueeze(1), state)
        return self.head(out.squeeze(1)), state


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Recompute each layer's activations in the backward instead of storing them (activation
    checkpointing). The layers keep their names and weights: checkpoints, the recurrent twin
    and FSDP's wrapping by layer class are unchanged."""
    for layer in layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False,
                                                     **kwargs)

        layer.forward = checkpointed


def build_sequence_model(cfg, vocab_size: int) -> nn.Module:
    """`cfg` is a SequenceModelConfig."""
    if cfg.arch == "lstm":
        return LSTMLM(vocab_size, cfg.d_model, cfg.n_layers, cfg.dropout)
    model = TransformerLM(vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff,
                          cfg.dropout, cfg.attention_type, cfg.attention_chunk_size, cfg.norm,
                          cfg.tie_embeddings, cfg.init, cfg.token_shift, cfg.attention_decay,
                          cfg.feed_forward_shift, cfg.feed_forward_shift_start)
    if cfg.activation_checkpointing:
        checkpoint_layers(model.encoder.layers)
    return model
