"""fast-transformers masks made without reading values back from the device.

The library's LengthMask computes `all_ones` with `.item()` when it is made, and FullMask
computes it lazily as a device tensor that attention layers then test in an `if`: either way
the host waits for the device in every forward pass (and torch.compile breaks the graph there).
These build the same masks with `all_ones` known up front.
"""

from __future__ import annotations

import functools

import torch
from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask


class PaddingMask(LengthMask):
    """A LengthMask of (N,) lengths padded to max_len. `all_ones` is False without asking the
    device: applying the mask to rows that have no padding changes nothing."""

    def __init__(self, lengths: torch.Tensor, max_len: int):
        self._device = lengths.device
        self._lengths = lengths
        self._max_len = max_len
        self._bool_matrix = None
        self._all_ones = False


@functools.lru_cache(maxsize=16)
def no_padding_mask(batch: int, length: int, device: torch.device) -> LengthMask:
    """Every row is `length` long."""
    mask = PaddingMask(torch.full((batch,), length, device=device), length)
    mask._all_ones = True
    return mask


@functools.lru_cache(maxsize=16)
def full_mask(rows: int, columns: int, device: torch.device) -> FullMask:
    """Every query may attend to every key."""
    mask = FullMask(N=rows, M=columns, device=device)
    mask._all_ones = True
    return mask


class CausalMask(TriangularCausalMask):
    """TriangularCausalMask without its device read (its `all_ones` is known to be False), so
    that torch.compile traces a whole forward pass as one graph."""

    def __init__(self, length: int, device: torch.device):
        self._device = device
        self._lengths = torch.arange(1, length + 1, device=device)
        self._max_len = length
        self._bool_matrix = None
        self._all_ones = False
        self._lower_triangular = True


@functools.lru_cache(maxsize=16)
def causal_mask(length: int, device: torch.device) -> TriangularCausalMask:
    """Made once per length and device, then reused."""
    return CausalMask(length, device)
