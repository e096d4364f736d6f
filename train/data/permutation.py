"""A seeded random permutation of [0, n) evaluated at any positions, without materializing it.

The data order of an epoch is `permute(positions, n, seed, epoch)`: a function of the seed, the
epoch and the global position alone, so a run resumes exactly at any position and on any number
of processes, and an epoch of 10^9 samples costs no memory. It is a Feistel network (a
bijection on 2^(2h) values, with a 64-bit mixing round function) restricted to [0, n) by
cycle walking: values that land outside are permuted again until they land inside.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> list[np.uint64]:
    base = np.array([(seed * 1_000_003 + epoch) & (2**64 - 1)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return [np.uint64(_mix(base + np.uint64(r + 1) * np.uint64(0x9E3779B97F4A7C15))[0])
                for r in range(ROUNDS)]


def permute(positions, n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """perm[positions] for a pseudo-random permutation perm of range(n) (int64 array)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros(len(positions), dtype=np.int64)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # 2^(2*half_bits) >= n
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    keys = _round_keys(seed, epoch)

    def feistel(x):
        left, right = x >> shift, x & mask
        with np.errstate(over="ignore"):
            for key in keys:
                left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    out = feistel(positions)
    outside = out >= np.uint64(n)
    while outside.any():  # at most a few rounds: the domain is less than 4n
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)
