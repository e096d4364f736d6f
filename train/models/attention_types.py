"""The attention types the project builds, one spec each: the only place that knows what an
attention can do. Config validation, the model builders and the FLOPs count all read it.

Facts only (no torch, no fast-transformers import), so a config validates without loading model
code. `tests/test_models.py` checks every spec against fast-transformers' registries.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

# Roles an attention plays in a model:
CAUSAL = "causal"    # LM / decoder self-attention: causal mask, with a recurrent form for sampling
ENCODER = "encoder"  # bidirectional self-attention over padded rows (key length masks)
CROSS = "cross"      # decoder cross attention, with a recurrent cross form for decoding
ROLES = (CAUSAL, ENCODER, CROSS)

# How chunked-causal-linear's state may forget (train.models.attention.state_decay_rates).
STATE_DECAYS = ("none", "multiscale")


def _softmax_flops(queries: float, keys: float, d_model: int, n_heads: int) -> float:
    """Scores (Q K^T) and the weighted sum of values: 2 x 2 x queries x keys x d_model."""
    return 4.0 * queries * keys * d_model


def _linear_flops(queries: float, keys: float, d_model: int, n_heads: int) -> float:
    """Each key folded into the (d_head x d_head per head) key-value state, each query reads
    it: 2 x (queries + keys) x d_model x d_head."""
    return 2.0 * (queries + keys) * d_model * (d_model // n_heads)


@dataclass(frozen=True)
class AttentionSpec:
    name: str  # the name in fast-transformers' AttentionRegistry
    roles: frozenset[str]
    # The library's compiled causal kernel runs in fp32 only: run it with autocast off.
    fp32_only: bool = False
    # Builder kwargs this type alone takes, from the model's settings: {builder kwarg: setting}.
    config_kwargs: dict[str, str] = field(default_factory=dict)
    # The same for kwargs that its recurrent twin takes too (settings a model may lack).
    twin_config_kwargs: dict[str, str] = field(default_factory=dict)
    # FLOPs of one layer for a sequence of `queries` attending to `keys` positions (forward).
    # None: no formula; the metrics then report MFU as unknown rather than guess.
    flops: Callable[[float, float, int, int], float] | None = None

    def builder_kwargs(self, settings: dict) -> dict:
        """The extra kwargs for fast-transformers' builders, e.g. the chunk size."""
        return {kwarg: settings[key] for kwarg, key in self.config_kwargs.items()}

    def twin_builder_kwargs(self, settings: dict) -> dict:
        """The extra kwargs for both builders, parallel and recurrent, e.g. the state decay."""
        return {kwarg: settings[key] for kwarg, key in self.twin_config_kwargs.items()
                if key in settings}


ATTENTION_TYPES: dict[str, AttentionSpec] = {spec.name: spec for spec in [
    AttentionSpec("chunked-causal-linear", frozenset({CAUSAL}),
                  config_kwargs={"causal_chunk_size": "attention_chunk_size"},
                  twin_config_kwargs={"state_decay": "attention_decay"},
                  flops=_linear_flops),
    AttentionSpec("causal-linear", frozenset({CAUSAL}), fp32_only=True, flops=_linear_flops),
    AttentionSpec("full", frozenset({CAUSAL, ENCODER, CROSS}), flops=_softmax_flops),
    AttentionSpec("linear", frozenset({ENCODER, CROSS}), flops=_linear_flops),
    # Encoders the library offers whose cost depends on the data or their own parameters.
    AttentionSpec("clustered", frozenset({ENCODER})),
    AttentionSpec("improved-clustered", frozenset({ENCODER})),
    AttentionSpec("reformer", frozenset({ENCODER})),
    AttentionSpec("exact-topk", frozenset({ENCODER})),
    AttentionSpec("local", frozenset({ENCODER})),
    AttentionSpec("conditional-full", frozenset({ENCODER})),
]}

ROLE_WORDS = {CAUSAL: "causal self-attention", ENCODER: "encoder attention",
              CROSS: "cross attention"}


def names_for(role: str) -> list[str]:
    return sorted(name for name, spec in ATTENTION_TYPES.items() if role in spec.roles)


def check_attention(name: str, role: str) -> str:
    """`name` if it can play `role`; else ValueError naming the ones that can."""
    known = names_for(role)
    if name in known:
        return name
    if name in ATTENTION_TYPES:
        raise ValueError(f"{name!r} cannot be used as {ROLE_WORDS[role]}; choose one of: "
                         f"{', '.join(known)}")
    hint = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"unknown attention type {name!r}"
                     + (f"; did you mean {', '.join(hint)}?" if hint else
                        f"; choose one of: {', '.join(known)}"))


def check_state_decay(decay: str, name: str) -> str:
    """`decay` if attention `name` can take it; else ValueError saying how to fix the config."""
    able = [n for n, spec in ATTENTION_TYPES.items() if "state_decay" in spec.twin_config_kwargs]
    if decay != "none" and name not in able:
        raise ValueError(f"attention_decay={decay} needs attention_type={' or '.join(able)} "
                         f"(got {name}); or set attention_decay=none")
    return decay


def attention_flops(name: str, queries: float, keys: float, d_model: int,
                    n_heads: int) -> float | None:
    """Forward FLOPs of one attention layer (see AttentionSpec.flops), None if unknown."""
    formula = ATTENTION_TYPES[name].flops
    return None if formula is None else formula(queries, keys, d_model, n_heads)
