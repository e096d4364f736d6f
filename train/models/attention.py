"""Causal linear attention computed chunk-wise with plain PyTorch ops, registered in
fast-transformers' registries as ``chunked-causal-linear``.

Same math as the library's ``CausalLinearAttention`` (feature map, default elu+1, normalizer with
the same eps, key length masks) but instead of the compiled fp32-only ``causal_dot_product`` it
splits the sequence into chunks of C positions:

* inside a chunk, the masked quadratic form ``tril(Q K^T) V`` (dense matmuls);
* across chunks, a running state ``S = sum K^T V`` (and ``z = sum K``), kept in fp32.

That is O(L*C*D + L*D*M) work in large matmuls, runs on CPU and CUDA, under autocast, with
autograd and torch.compile. The recurrent twin (one token at a time, for sampling) is registered
under the same name so ``RecurrentEncoderBuilder`` builds it from the same config.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import fast_transformers.builders  # noqa: F401  (imports every attention, filling both registries)
from fast_transformers.attention_registry import (
    AttentionRegistry,
    Callable,
    EventDispatcherInstance,
    Int,
    Optional,
    RecurrentAttentionRegistry,
)
from fast_transformers.feature_maps import elu_feature_map
from fast_transformers.recurrent._utils import check_state

NAME = "chunked-causal-linear"


def chunked_causal_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          chunk_size: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """Normalized causal linear attention on feature-mapped inputs.

    q, k: (N, L, H, D) already passed through the feature map (non-negative); v: (N, L, H, M).
    Returns (N, L, H, M) in the input dtype; the cross-chunk state is accumulated in fp32.
    """
    N, L, H, D = q.shape
    M = v.shape[-1]
    C = min(chunk_size, L)
    pad = (-L) % C
    # (N, H, L, E) so that each (n, h) is one batch of matmuls.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if pad:
        # Zero keys contribute nothing; padded query rows are dropped at the end.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nc = (L + pad) // C
    q = q.reshape(N, H, nc, C, D)
    k = k.reshape(N, H, nc, C, D)
    v = v.reshape(N, H, nc, C, M)

    # Inside each chunk: masked quadratic form.
    scores = torch.matmul(q, k.transpose(-1, -2))  # (N, H, nc, C, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, 0)
    out = torch.matmul(scores, v)
    norm = scores.float().sum(-1)

    # Across chunks: exclusive prefix sums of K^T V and of K, in fp32.
    kv = torch.matmul(k.transpose(-1, -2), v).float()  # (N, H, nc, D, M)
    state = kv.cumsum(2) - kv
    ksum = k.float().sum(-2)  # (N, H, nc, D)
    zstate = ksum.cumsum(2) - ksum
    out = out.float() + torch.matmul(q.float(), state)
    norm = norm + torch.matmul(q.float(), zstate.unsqueeze(-1)).squeeze(-1)

    out = out / (norm.unsqueeze(-1) + eps)
    out = out.reshape(N, H, nc * C, M)[:, :, :L]
    return out.transpose(1, 2).to(v.dtype).contiguous()


class ChunkedCausalLinearAttention(nn.Module):
    """Drop-in for fast-transformers' CausalLinearAttention (same constructor and forward)."""

    def __init__(self, query_dimensions: int, feature_map=None, eps: float = 1e-6,
                 causal_chunk_size: int = 64, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.chunk_size = causal_chunk_size

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        if not attn_mask.lower_triangular:
            raise RuntimeError(f"{NAME} attention needs a lower-triangular (causal) mask")
        self.feature_map.new_feature_map(queries.device)
        q = self.feature_map.forward_queries(queries)
        k = self.feature_map.forward_keys(keys)
        if not key_lengths.all_ones:
            k = k * key_lengths.float_matrix[:, :, None, None].to(k.dtype)
        return chunked_causal_linear(q, k, values, self.chunk_size, self.eps)


class RecurrentFP32LinearAttention(nn.Module):
    """One-token-at-a-time causal linear attention whose state (S, z) is always fp32.

    Numerically the same recurrence as the library's RecurrentLinearAttention; keeping the
    running sums in fp32 stops them from losing precision under bf16/fp16 autocast.
    """

    def __init__(self, query_dimensions: int, feature_map=None, eps: float = 1e-6,
                 event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps

    def forward(self, query, key, value, state=None, memory=None):
        state = check_state(state, memory)
        if state is None:
            self.feature_map.new_feature_map(query.device)
        q = self.feature_map.forward_queries(query).float()  # (N, H, D)
        k = self.feature_map.forward_keys(key).float()
        v = value.float()  # (N, H, M)
        if state is None:
            S = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
            z = q.new_zeros(q.shape)
        else:
            S, z = state
        S = S + k.unsqueeze(-1) * v.unsqueeze(-2)
        z = z + k
        norm = (q * z).sum(-1, keepdim=True) + self.eps
        out = torch.matmul(q.unsqueeze(-2), S).squeeze(-2) / norm
        return out.to(value.dtype), [S, z]


def _register() -> None:
    if NAME in AttentionRegistry:
        return
    AttentionRegistry.register(NAME, ChunkedCausalLinearAttention, [
        ("query_dimensions", Int),
        ("feature_map", Optional(Callable)),
        ("causal_chunk_size", Optional(Int, 64)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ])
    RecurrentAttentionRegistry.register(NAME, RecurrentFP32LinearAttention, [
        ("query_dimensions", Int),
        ("feature_map", Optional(Callable)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ])


def registered_attention_types() -> list[str]:
    """Attention types both builders know (a causal LM needs the parallel and recurrent form)."""
    return sorted(set(AttentionRegistry.keys) & set(RecurrentAttentionRegistry.keys))


_register()
