"""Causal linear attention computed chunk-wise with plain PyTorch ops, registered in
fast-transformers' registries as ``chunked-causal-linear``.

Same math as the library's ``CausalLinearAttention`` (feature map, default elu+1, normalizer
``Z = 1 / (Q . cumsum(K) + eps)``, key length masks) but instead of the compiled fp32-only
``causal_dot_product`` it splits the sequence into chunks of C positions:

* inside a chunk, the masked quadratic form ``tril(Q K^T) V`` (dense batched matmuls);
* across chunks, a running state ``S = sum K^T V`` (and ``z = sum K``), kept in fp32.

That is O(L*C*D + L*D*M) work in batched matmuls. It runs on CPU and CUDA, under autocast
(chunk-local matmuls in the autocast dtype, cross-chunk state and normalizer in fp32), with
autograd (a hand-written backward that recomputes the chunk scores instead of storing them) and
under torch.compile. The recurrent twin (one token at a time, for sampling) is registered under
the same name so ``RecurrentEncoderBuilder`` builds it from the same config. Both take an
optional per-head decay of the state (``state_decay``, see state_decay_rates).

CPU notes (why the code looks the way it does): the work goes slab by slab, a slab being a run
of chunks of every (batch, head) pair, so that a slab's working set stays in cache; every
matmul writes into a workspace reused from slab to slab, because fresh memory costs a page fault
per 4 KiB on first touch, comparable to the matmuls themselves; the prefix sums over chunks are
in-place adds, one per chunk, because ``cumsum`` over a middle dimension is a scalar loop on
CPU; the large outputs ask for transparent huge pages; each slab runs on all of torch's threads
or on one, whichever has lately been faster (on shared cores, one; see _SlabThreads). On CUDA
(or while compiling) one slab covers the whole sequence and the prefix sums are plain
``cumsum``.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch
from torch import nn

import fast_transformers.builders  # noqa: F401  (imports every attention, filling both registries)
from fast_transformers.attention_registry import (
    AttentionRegistry,
    Callable,
    Choice,
    EventDispatcherInstance,
    Int,
    Optional,
    RecurrentAttentionRegistry,
)
from fast_transformers.feature_maps import ActivationFunctionFeatureMap
from fast_transformers.recurrent._utils import check_state
from .attention_types import STATE_DECAYS

NAME = "chunked-causal-linear"

# Rows (positions x heads x batch) per CPU slab: large enough that the batched matmuls stay
# efficient and the Python loop short, small enough that a slab's working set stays in cache.
# (Measured on a 2-core AVX-512 machine: 2048-4096 best, 8192 ~5% slower, 32768 ~40% slower.)
CPU_SLAB_ROWS = 4096
# Sequences of at most this many chunks may go one chunk per slab (see _chunk_groups).
ONE_CHUNK_SLABS = 64


_LOG2_E = 1.4426950408889634


class _EluPlusOne(torch.autograd.Function):
    """elu(x) + 1, the library's default feature map, keeping its output for the backward
    instead of its input.

    The derivative is 1 where x > 0 and exp(x) = elu(x) + 1 elsewhere, that is
    min(elu(x) + 1, 1): the output alone gives it. The attention keeps that output anyway, so
    the query and key projections are no longer held until the backward (two activations less
    per layer).
    """

    @staticmethod
    def forward(ctx, x):
        if x.device.type == "cpu":
            # exp(min(x, 0)) + max(x, 0): torch's CPU elu computes expm1 one element at a
            # time, ~8x slower than these vectorized ops (it was ~5% of a context-128 step).
            negative = torch.clamp_max(x, 0)
            if x.dtype in (torch.float32, torch.float64):
                # exp(y) as exp2(y log2 e): torch's CPU exp2 runs ~3x faster than its exp
                # (measured). Not in 16-bit types, where rounding y log2 e would cost precision.
                exp = negative.mul_(_LOG2_E).exp2_()
            else:
                exp = negative.exp_()
            out = exp.add_(torch.clamp_min(x, 0))
        else:
            out = torch.nn.functional.elu(x).add_(1)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return out.clamp(max=1).mul_(grad)  # one temporary, not two


elu_feature_map = ActivationFunctionFeatureMap.factory(_EluPlusOne.apply)


def _use_slabs(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _find_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _find_madvise()
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20


def _new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """torch.empty for a large result that will be written once, front to back.

    Fresh memory costs one page fault per 4 KiB page on first write, which for outputs of tens
    of MB is a sizeable fraction of this kernel's time on CPU. Asking the kernel for
    transparent huge pages (a hint, ignored where unsupported) makes it one fault per 2 MiB.
    """
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if _MADVISE is not None and _use_slabs(out) and out.nbytes >= 2 * _HUGE_PAGE:
        begin = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + out.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > begin:
            _MADVISE(begin, end - begin, _MADV_HUGEPAGE)
    return out


def _chunk_groups(B: int, C: int, nc: int, slabbed: bool) -> list[tuple[int, int]]:
    """Consecutive chunk ranges [c0, c1): one slab is one range, over every (batch, head)."""
    if not slabbed:
        return [(0, nc)]
    # A slab of one chunk needs no prefix sums (its state is the carry it enters with). With
    # half a slab's rows per chunk or more, one-chunk slabs ran 1.4-1.7x faster at context 128
    # (4 chunks) and 1.06-1.16x at 16-64 chunks, but 2.5% slower at 128 chunks (a longer Python
    # loop); with a quarter they broke even, below that they lost. They also keep a state per
    # chunk for the backward (M/C times the size of q over the sequence, twice that of
    # two-chunk slabs), hence at most ONE_CHUNK_SLABS of them.
    if 2 * B * C >= CPU_SLAB_ROWS and nc <= ONE_CHUNK_SLABS:
        per = 1
    else:
        per = max(1, CPU_SLAB_ROWS // (B * C))
    return [(c0, min(nc, c0 + per)) for c0 in range(0, nc, per)]


class _SlabThreads:
    """How many threads each CPU slab runs on: all of torch's intra-op threads, or one.

    A slab is a dozen small ops, and each op run on several threads ends in a barrier that
    waits for the slowest. Idle, two threads ran the kernel 1.6-1.9x faster than one. With
    other processes on the cores, a thread that has lost its core holds every barrier up for a
    scheduler time slice: with two busy processes per core, two threads ran 3.4-15x slower than
    idle (by how the barriers met the time slices) and one thread 2.6-3.2x (fast-transformers'
    kernel, one parallel loop per call: 3-4.7x).
    Which count wins depends on the load at the time, so the loop measures: each slab is
    timed, and the count with the lower recent time per row (for slabs of this shape) runs.
    A probe runs one slab of a call on the other count, whose figure becomes that slab's
    time, so that one probe can win the choice back (and a lucky one is undone by the next
    slabs' times). A probe costs a slab on the slower count (on shared cores a slab on two
    threads took 0.1-0.3 s), so each probe lost doubles the calls to the next, up to
    MAX_PROBE_INTERVAL; after any change of count the next call probes, so that a change made
    on a passing cost (fresh memory's page faults) is soon undone. The results do not depend
    on the count (each output element is computed by one thread, in the same order; tested).
    """

    MAX_PROBE_INTERVAL = 128  # calls; 32 steps of a 4-layer model, forward and backward each
    # Weight of the newest slab's time in the running count's average, each time counted at
    # most OUTLIER times that average: one slab's stall (a page fault can cost 40-80 ms on two
    # threads, measured) moves it 1.3x at most and does not change the count; shared cores,
    # slowing every slab, change it within a few slabs.
    SMOOTHING = 0.1
    OUTLIER = 4.0

    def __init__(self, clock=time.perf_counter):
        self.enabled = True
        self.clock = clock
        self.seconds_per_row: dict[tuple[tuple, int], float] = {}  # (shape, count)
        self.calls: dict[tuple, int] = {}  # per slab shape
        self.next_probe: dict[tuple, int] = {}  # the call that probes next
        self.probe_interval: dict[tuple, int] = {}

    def __call__(self, shape: tuple, slabs: list, rows_per_chunk: int, like: torch.Tensor):
        """`slabs` ([(index, (c0, c1))], in walking order), each run on its count when it
        yields (on CPU, several threads, outside torch.compile). `shape` names the work per
        row: slabs with the same shape are timed together."""
        if not (self.enabled and _use_slabs(like) and torch.get_num_threads() > 1):
            return slabs
        return self._timed(shape, slabs, rows_per_chunk)

    def _timed(self, shape, slabs, rows_per_chunk):
        threads = torch.get_num_threads()
        calls = self.calls[shape] = self.calls.get(shape, 0) + 1
        probe = slabs[len(slabs) // 2][0] if calls >= self.next_probe.get(shape, 1) else None
        best_before = self._choose(shape, threads)
        try:
            for i, (c0, c1) in slabs:
                count = self._choose(shape, threads, other=i == probe)
                torch.set_num_threads(count)
                start = self.clock()
                yield i, (c0, c1)
                per_row = (self.clock() - start) / ((c1 - c0) * rows_per_chunk)
                old = self.seconds_per_row.get((shape, count), per_row)
                per_row = min(per_row, self.OUTLIER * old)
                self.seconds_per_row[shape, count] = (
                    per_row if i == probe else old + self.SMOOTHING * (per_row - old))
        finally:
            torch.set_num_threads(threads)
        if self._choose(shape, threads) != best_before:
            self.probe_interval[shape] = 1
        elif probe is not None:
            self.probe_interval[shape] = min(2 * self.probe_interval.get(shape, 1),
                                             self.MAX_PROBE_INTERVAL)
        else:
            return
        self.next_probe[shape] = calls + self.probe_interval[shape]

    def _choose(self, shape: tuple, threads: int, other: bool = False) -> int:
        one = self.seconds_per_row.get((shape, 1))
        many = self.seconds_per_row.get((shape, threads))
        best = 1 if one is not None and many is not None and one < many else threads
        return (threads if best == 1 else 1) if other else best


SLAB_THREADS = _SlabThreads()


def _scan(x: torch.Tensor, carry: torch.Tensor, out: torch.Tensor, reverse: bool = False,
          factor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive prefix sums along dim 1 of x (B, g, F), starting from carry (B, F).

    out[:, j] = carry + sum of x[:, j'] for j' < j (j' > j when reverse). Returns those sums
    (in `out` on the CPU slab path) and the carry for the next slab, carry + sum over all j.
    With `factor` (B,), the running sum is multiplied by it at every step (a decaying state):
    out[:, j] = factor * out[:, j - 1] + x[:, j - 1] (j + 1 when reverse).
    """
    g = x.shape[1]
    if not _use_slabs(x) and factor is not None:
        return _decayed_scan_dense(x, carry, factor, reverse)
    if not _use_slabs(x):
        # One group covers everything here; cumsum is one fast kernel on GPU / under compile.
        xs = x.flip(1) if reverse else x
        prefix = xs.cumsum(1)
        excl = prefix - xs + carry.unsqueeze(1)
        excl = excl.flip(1) if reverse else excl
        return excl, prefix[:, -1] + carry
    # On CPU cumsum over a middle dimension is a slow scalar loop; g in-place adds are not.
    order = range(g - 1, -1, -1) if reverse else range(g)
    f = None if factor is None else factor.unsqueeze(1)
    prev = None
    for j in order:
        if prev is None:
            out[:, j].copy_(carry)
        elif f is None:
            torch.add(out[:, prev], x[:, prev], out=out[:, j])
        else:
            torch.addcmul(x[:, prev], out[:, prev], f, out=out[:, j])
        prev = j
    if f is None:
        return out, out[:, prev] + x[:, prev]
    return out, torch.addcmul(x[:, prev], out[:, prev], f)


# Steps of a decayed scan off the CPU slab path done as one matmul; longer scans go block by
# block, so that their cost stays linear in the number of chunks.
DENSE_SCAN_BLOCK = 16


def _decayed_scan_dense(x, carry, factor, reverse):
    """_scan with a factor in whole-tensor ops (GPU, torch.compile). Within a block of
    DENSE_SCAN_BLOCK steps, step j' reaches step j with weight factor^(j - j' - 1): one
    matmul; the states entering the blocks are the same scan over the blocks' own sums."""
    if reverse:  # the forward scan of the sequence read backwards
        out, last = _decayed_scan_dense(x.flip(1), carry, factor, False)
        return out.flip(1), last
    B, g, _ = x.shape
    b = min(g, DENSE_SCAN_BLOCK)
    nb = -(-g // b)
    blocks = nn.functional.pad(x, (0, 0, 0, nb * b - g)).view(B, nb, b, -1)
    j = torch.arange(b, device=x.device)
    steps = j.view(-1, 1) - j.view(1, -1) - 1
    base = factor.view(B, 1, 1)
    within = torch.where(steps >= 0, base ** steps.clamp(min=0), 0.0)  # (B, b, b)
    inner = torch.matmul(within.unsqueeze(1), blocks)  # from each block's start
    if nb == 1:
        starts = carry.unsqueeze(1)
    else:  # each block's sum decayed to its end, scanned across blocks
        sums = torch.matmul((base ** (b - 1 - j)).unsqueeze(1), blocks).squeeze(2)
        starts, _ = _decayed_scan_dense(sums, carry, factor ** b, False)
    out = inner.add_((base.view(B, 1, 1) ** j).view(B, 1, b, 1) * starts.unsqueeze(2))
    out = out.view(B, nb * b, -1)[:, :g].contiguous()  # callers view it per chunk
    return out, out[:, g - 1] * factor.unsqueeze(1) + x[:, g - 1]


class _ChunkedCausalLinear(torch.autograd.Function):
    """out = (causal(Q K^T) V) / (causal(Q K^T) 1 + eps), chunk-wise.

    The backward recomputes each slab's chunk scores and states rather than storing them (about
    the same time as storing and reloading, without the memory); it keeps only the output, the
    fp32 normalizer and the fp32 states at slab boundaries.
    """

    @staticmethod
    def forward(ctx, q, k, v, chunk_size: int, eps: float, decay: torch.Tensor | None):
        with torch.autocast(q.device.type, enabled=False):
            out, den, carries_kv, carries_z = _forward(q, k, v, chunk_size, eps, decay)
        ctx.save_for_backward(q, k, v, out, den, carries_kv, carries_z)
        ctx.chunk_size, ctx.decay = chunk_size, decay
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = _backward(*ctx.saved_tensors, grad_out, ctx.chunk_size, ctx.decay)
        return (*grads, None, None, None)


class _Slabs:
    """Geometry of one call, and workspaces reused from slab to slab.

    A slab is chunks [c0, c1) of every (batch, head) pair, packed as (B * g, C, E) with
    B = N * H, g = c1 - c0, zero-padded to whole chunks.

    With a decay rate gamma per head (a key's weight shrinks by gamma for every position it
    falls behind), a chunk's scores are weighted by gamma^(i - j) instead of only masked, keys
    enter the state weighted by their decay to the chunk's end, queries read it weighted by
    theirs from the chunk's start, and the state decays by gamma^C from chunk to chunk.
    """

    def __init__(self, q: torch.Tensor, v: torch.Tensor, chunk_size: int,
                 decay: torch.Tensor | None = None):
        self.N, self.L, self.H, self.D = q.shape
        self.M = v.shape[-1]
        self.B = self.N * self.H
        self.C = max(1, min(int(chunk_size), self.L))
        self.nc = -(-self.L // self.C)
        self.groups = _chunk_groups(self.B, self.C, self.nc, _use_slabs(q))
        self.buffers: dict[str, torch.Tensor] = {}
        self.chunk_decay = None  # (B,): gamma^C of each pair's head
        if decay is not None:
            rate = decay.to(q.device, torch.float32).view(self.H, 1, 1)
            i = torch.arange(self.C, device=q.device)
            behind = (i.view(-1, 1) - i.view(1, -1)).clamp(min=0)
            self.score_weights = (rate ** behind).tril_()  # (H, C, C)
            self.from_start = rate ** (i + 1).view(-1, 1)  # (H, C, 1)
            self.to_end = rate ** (self.C - 1 - i).view(-1, 1)  # (H, C, 1)
            self.chunk_decay = (rate.view(self.H) ** self.C).repeat(self.N)

    def shape(self, direction: str) -> tuple:
        """What sets the work per row of a slab (for SLAB_THREADS)."""
        chunks = self.groups[0][1] - self.groups[0][0]
        decayed = self.chunk_decay is not None
        return direction, self.B * chunks, self.L, self.C, self.D, self.M, decayed

    def _per_head_(self, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """t (B * g, C, E) times weights (H, C, E or 1), in place, per (batch, head, chunk)."""
        t.view(self.N, self.H, -1, *t.shape[1:]).mul_(weights.unsqueeze(1))
        return t

    def causal_(self, scores: torch.Tensor) -> torch.Tensor:
        """Chunk scores (B * g, C, C) masked to the causal part, and decayed, in place."""
        return scores.tril_() if self.chunk_decay is None else self._per_head_(
            scores, self.score_weights)

    def to_chunk_end_(self, t: torch.Tensor) -> torch.Tensor:
        """Rows (B * g, C, E) by key position, decayed to their chunk's end, in place."""
        return t if self.chunk_decay is None else self._per_head_(t, self.to_end)

    def from_chunk_start_(self, t: torch.Tensor) -> torch.Tensor:
        """Rows (B * g, C, E) by query position, decayed from their chunk's start, in place."""
        return t if self.chunk_decay is None else self._per_head_(t, self.from_start)

    def next_state(self, state: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
        """The state (B, F) one chunk later, with that chunk's (B, F) contribution."""
        if self.chunk_decay is None:
            return state + added
        return torch.addcmul(added, state, self.chunk_decay.unsqueeze(1))

    def ws(self, name, shape, like, dtype=None):
        """A workspace of this shape, in memory reused from the previous slab."""
        dtype = dtype or like.dtype
        need = 1
        for size in shape:
            need *= size
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(need, dtype=dtype, device=like.device)
        return buf[:need].view(shape)

    def rows(self, c0, c1):
        return c0 * self.C, min(c1 * self.C, self.L)

    def pack(self, name, t, c0, c1, pad_value=0.0):
        t0, t1 = self.rows(c0, c1)
        g = c1 - c0
        if t.dim() == 3:  # (N, H, L): per-position scalars, already head-major
            buf = self.ws(name, (self.N, self.H, g * self.C), t)
            buf[:, :, :t1 - t0].copy_(t[:, :, t0:t1])
            if t1 - t0 < g * self.C:
                buf[:, :, t1 - t0:].fill_(pad_value)
            return buf.view(self.B * g, self.C)
        E = t.shape[-1]
        buf = self.ws(name, (self.N, self.H, g * self.C, E), t)
        buf[:, :, :t1 - t0].copy_(t[:, t0:t1].permute(0, 2, 1, 3))
        if t1 - t0 < g * self.C:
            buf[:, :, t1 - t0:].fill_(pad_value)  # zero keys/values/grads add nothing
        return buf.view(self.B * g, self.C, E)

    def unpack(self, dst, buf, c0, c1):
        t0, t1 = self.rows(c0, c1)
        if dst.dim() == 3:
            grid = buf.view(self.N, self.H, (c1 - c0) * self.C)[:, :, :t1 - t0]
            dst[:, :, t0:t1].copy_(grid)
            return
        grid = buf.view(self.N, self.H, (c1 - c0) * self.C, dst.shape[-1])[:, :, :t1 - t0]
        dst[:, t0:t1].copy_(grid.permute(0, 2, 1, 3))


def _forward(q, k, v, chunk_size, eps, decay):
    sl = _Slabs(q, v, chunk_size, decay)
    B, C, D, M = sl.B, sl.C, sl.D, sl.M
    f32 = torch.float32
    out = _new_output((sl.N, sl.L, sl.H, M), v)
    den_all = torch.empty(sl.N, sl.H, sl.L, dtype=f32, device=v.device)
    # The cross-chunk state entering each slab after the first (zeros), kept for the backward.
    carries_kv = q.new_empty(len(sl.groups) - 1, B, D * M, dtype=f32)
    carries_z = q.new_empty(len(sl.groups) - 1, B, D, dtype=f32)
    carry_kv = q.new_zeros(B, D * M, dtype=f32)
    carry_z = q.new_zeros(B, D, dtype=f32)
    for i, (c0, c1) in SLAB_THREADS(sl.shape("forward"), list(enumerate(sl.groups)), B * C, q):
        g = c1 - c0
        G = B * g
        if i:
            carries_kv[i - 1] = carry_kv
            carries_z[i - 1] = carry_z
        qc, kc, vc = sl.pack("q", q, c0, c1), sl.pack("k", k, c0, c1), sl.pack("v", v, c0, c1)
        # Inside each chunk: causal scores, their row sums (normalizer) and scores @ V.
        scores = sl.causal_(torch.bmm(qc, kc.transpose(1, 2), out=sl.ws("scores", (G, C, C), q)))
        den = torch.sum(scores, -1, dtype=f32, out=sl.ws("den", (G, C), q, f32))
        num = torch.bmm(scores, vc, out=sl.ws("num", (G, C, M), q))
        # Across chunks: exclusive prefix sums of K^T V and of K, in fp32. A one-chunk slab's
        # state is its carry (zero in the first slab), and the last slab's sums feed nothing.
        if g > 1 or i < len(sl.groups) - 1:
            kc = sl.to_chunk_end_(kc)  # the raw keys are not needed any more
            kv = torch.bmm(kc.transpose(1, 2), vc, out=sl.ws("kv", (G, D, M), q)).float()
            ksum = kc.sum(1, dtype=f32).view(B, g, D)
        if g == 1:
            state, zstate = carry_kv, carry_z
            if i < len(sl.groups) - 1:
                carry_kv = sl.next_state(carry_kv, kv.view(B, D * M))
                carry_z = sl.next_state(carry_z, ksum.view(B, D))
        else:
            state, carry_kv = _scan(kv.view(B, g, D * M), carry_kv,
                                    sl.ws("state", (B, g, D * M), q, f32), factor=sl.chunk_decay)
            zstate, carry_z = _scan(ksum, carry_z, sl.ws("zstate", (B, g, D), q, f32),
                                    factor=sl.chunk_decay)
        num = num.float()
        if i or g > 1:
            q32 = sl.from_chunk_start_(qc.float())
            num.baddbmm_(q32, state.view(G, D, M))
            den.unsqueeze(-1).baddbmm_(q32, zstate.view(G, D, 1))
        den.add_(eps)
        num.div_(den.unsqueeze(-1))
        sl.unpack(out, num.to(out.dtype), c0, c1)
        sl.unpack(den_all, den, c0, c1)
    return out, den_all, carries_kv, carries_z


def _backward(q, k, v, out, den_all, carries_kv, carries_z, grad_out, chunk_size, decay):
    sl = _Slabs(q, v, chunk_size, decay)
    B, C, D, M = sl.B, sl.C, sl.D, sl.M
    f32 = torch.float32
    dq, dk, dv = (_new_output(t.shape, t) for t in (q, k, v))
    # Gradients of the states flow right to left: walk the slabs backwards.
    dcarry_kv = q.new_zeros(B, D * M, dtype=f32)
    dcarry_z = q.new_zeros(B, D, dtype=f32)
    zero_kv, zero_z = q.new_zeros(B, D * M, dtype=f32), q.new_zeros(B, D, dtype=f32)
    slabs = list(enumerate(sl.groups))[::-1]
    for i, (c0, c1) in SLAB_THREADS(sl.shape("backward"), slabs, B * C, q):
        t0, t1 = sl.rows(c0, c1)
        g = c1 - c0
        G = B * g
        qc, kc, vc = sl.pack("q", q, c0, c1), sl.pack("k", k, c0, c1), sl.pack("v", v, c0, c1)
        gc = sl.pack("g", grad_out, c0, c1).float()
        den = sl.pack("den", den_all, c0, c1, pad_value=1.0).view(G, C, 1)
        # out = num / den: d num = g / den, d den = -(g . out) / den.
        oc = sl.pack("out", out, c0, c1)
        dden = torch.mul(gc, oc, out=sl.ws("prod", (G, C, M), q, f32)).sum(-1, keepdim=True)
        dden.div_(den).neg_()
        dnum = gc.div_(den)
        dnum_c = dnum.to(q.dtype)
        # Inside each chunk: gradient of the causal scores (normalizer included).
        dscores = torch.bmm(dnum_c, vc.transpose(1, 2), out=sl.ws("dscores", (G, C, C), q))
        sl.causal_(dscores.add_(dden.to(q.dtype)))
        scores = sl.causal_(torch.bmm(qc, kc.transpose(1, 2), out=sl.ws("scores", (G, C, C), q)))
        dvc = torch.bmm(scores.transpose(1, 2), dnum_c, out=sl.ws("dv", (G, C, M), q)).float()
        dqc = torch.bmm(dscores, kc, out=sl.ws("dq", (G, C, D), q)).float()
        dkc = torch.bmm(dscores.transpose(1, 2), qc, out=sl.ws("dk", (G, C, D), q)).float()
        # From here on queries and keys only meet the states: decayed like them, in place.
        qc, kc = sl.from_chunk_start_(qc), sl.to_chunk_end_(kc)
        q32, k32, v32 = qc.float(), kc.float(), vc.float()
        last = i == len(sl.groups) - 1
        if g == 1:
            # One chunk: its state is the carry saved by the forward (zero in the first slab)
            # and its state's gradient the carry from the right (zero in the last slab).
            if i:
                _add_query_grad(sl, dqc, dnum, dden, carries_kv[i - 1].view(G, D, M),
                                carries_z[i - 1].view(G, 1, D))
            dstate, dzstate = dcarry_kv, dcarry_z
            if i:
                dcarry_kv = sl.next_state(dcarry_kv,
                                          torch.bmm(q32.transpose(1, 2), dnum).view(B, D * M))
                dcarry_z = sl.next_state(dcarry_z, torch.bmm(dden.transpose(1, 2), q32).view(B, D))
        else:
            # Across chunks: this slab's states again, from the carry saved by the forward ...
            kv = torch.bmm(kc.transpose(1, 2), vc, out=sl.ws("kv", (G, D, M), q)).float()
            state, _ = _scan(kv.view(B, g, D * M), carries_kv[i - 1] if i else zero_kv,
                             sl.ws("state", (B, g, D * M), q, f32), factor=sl.chunk_decay)
            ksum = kc.sum(1, dtype=f32).view(B, g, D)
            zstate, _ = _scan(ksum, carries_z[i - 1] if i else zero_z,
                              sl.ws("zstate", (B, g, D), q, f32), factor=sl.chunk_decay)
            _add_query_grad(sl, dqc, dnum, dden, state.view(G, D, M), zstate.view(G, 1, D))
            # ... and the gradients of the states: reverse prefix sums of Q^T dnum and Q^T dden.
            qt_dnum = torch.bmm(q32.transpose(1, 2), dnum, out=sl.ws("qtg", (G, D, M), q, f32))
            dstate, dcarry_kv = _scan(qt_dnum.view(B, g, D * M), dcarry_kv,
                                      sl.ws("dstate", (B, g, D * M), q, f32), reverse=True,
                                      factor=sl.chunk_decay)
            qt_dden = torch.bmm(dden.transpose(1, 2), q32).view(B, g, D)
            dzstate, dcarry_z = _scan(qt_dden, dcarry_z, sl.ws("dzstate", (B, g, D), q, f32),
                                      reverse=True, factor=sl.chunk_decay)
        if g > 1 or not last:
            dstate = dstate.view(G, D, M)
            if sl.chunk_decay is None:
                dkc.baddbmm_(v32, dstate.transpose(1, 2))
                dkc.add_(dzstate.view(G, 1, D))
            else:
                term = torch.bmm(v32, dstate.transpose(1, 2)).add_(dzstate.view(G, 1, D))
                dkc.add_(sl.to_chunk_end_(term))
            dvc.baddbmm_(k32, dstate)
        sl.unpack(dq, dqc.to(dq.dtype), c0, c1)
        sl.unpack(dk, dkc.to(dk.dtype), c0, c1)
        sl.unpack(dv, dvc.to(dv.dtype), c0, c1)
    return dq, dk, dv


def _add_query_grad(sl, dqc, dnum, dden, state, zstate):
    """dqc += dnum state^T + dden zstate^T (the queries' gradient through the state), with the
    queries' decay from their chunk's start where the state decays."""
    if sl.chunk_decay is None:
        dqc.baddbmm_(dnum, state.transpose(1, 2))
        dqc.baddbmm_(dden, zstate)
        return
    term = torch.bmm(dnum, state.transpose(1, 2)).baddbmm_(dden, zstate)
    dqc.add_(sl.from_chunk_start_(term))


def chunked_causal_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          chunk_size: int = 64, eps: float = 1e-6,
                          decay: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized causal linear attention on feature-mapped inputs.

    q, k: (N, L, H, D) already passed through the feature map (non-negative); v: (N, L, H, M).
    Returns (N, L, H, M): in the autocast dtype when autocast is on for the inputs' device (like
    a matmul), else in the promoted input dtype. The cross-chunk state is accumulated in fp32.
    decay: None, or (H,) rates in (0, 1]: position t then weighs key s by decay^(t - s), in
    the sums of both the output and its normalizer (see state_decay_rates).
    """
    if q.shape[:3] != k.shape[:3] or q.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q, k (N, L, H, D) and v (N, L, H, M), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if decay is not None and decay.shape != (q.shape[2],):
        raise ValueError(f"expected one decay rate per head ({q.shape[2]}), got "
                         f"{tuple(decay.shape)}")
    return _ChunkedCausalLinear.apply(q, k, v, int(chunk_size), float(eps), decay)


def state_decay_rates(kind: str, n_heads: int, device=None) -> torch.Tensor | None:
    """Per-head rates at which the attention state forgets (None: it never does).

    "multiscale": head h keeps rate 1 - 2^-e_h with e_h spread evenly from 12 down to 5, so a
    key's weight halves after ~0.7 * 2^e_h positions: ~2800 for the first head, ~22 for the
    last. Without decay every query averages over all keys before it, which at long context
    blurs what the near ones say.
    """
    if kind == "none":
        return None
    if kind != "multiscale":
        raise ValueError(f"unknown state decay {kind!r}; choose one of: {', '.join(STATE_DECAYS)}")
    exponents = torch.linspace(12.0, 5.0, n_heads, dtype=torch.float64)
    return (1 - 2.0 ** -exponents).to(device=device, dtype=torch.float32)


class _DecayRates:
    """state_decay_rates for a module, made once per head count and device."""

    def __init__(self, kind: str):
        state_decay_rates(kind, 1)  # an unknown kind fails at construction
        self.kind = kind
        self.made: dict = {}

    def __call__(self, n_heads: int, device) -> torch.Tensor | None:
        key = (n_heads, device)
        if key not in self.made:
            self.made[key] = state_decay_rates(self.kind, n_heads, device)
        return self.made[key]


class ChunkedCausalLinearAttention(nn.Module):
    """Drop-in for fast-transformers' CausalLinearAttention (same constructor and forward),
    with an optional decaying state (`state_decay`, see state_decay_rates)."""

    def __init__(self, query_dimensions: int, feature_map=None, eps: float = 1e-6,
                 causal_chunk_size: int = 64, event_dispatcher="", state_decay: str = "none"):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.chunk_size = causal_chunk_size
        self.decay = _DecayRates(state_decay)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        if not attn_mask.lower_triangular:
            raise RuntimeError(f"{NAME} attention needs a lower-triangular (causal) mask")
        self.feature_map.new_feature_map(queries.device)
        q = self.feature_map.forward_queries(queries)
        k = self.feature_map.forward_keys(keys)
        if not key_lengths.all_ones:
            k = k * key_lengths.float_matrix[:, :, None, None].to(k.dtype)
        return chunked_causal_linear(q, k, values, self.chunk_size, self.eps,
                                     self.decay(queries.shape[2], queries.device))


class RecurrentFP32LinearAttention(nn.Module):
    """One-token-at-a-time causal linear attention whose state (S, z) is always fp32.

    Numerically the same recurrence as the library's RecurrentLinearAttention; keeping the
    running sums in fp32 stops them from losing precision under bf16/fp16 autocast. The state
    has a fixed size, so each step costs the same at any position. With `state_decay` the
    state decays by each head's rate before every step (the twin of the chunked attention's).
    """

    def __init__(self, query_dimensions: int, feature_map=None, eps: float = 1e-6,
                 event_dispatcher="", state_decay: str = "none"):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.decay = _DecayRates(state_decay)

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
            if S.shape[0] != q.shape[0]:
                raise ValueError("the batch size changed during iteration")
        decay = self.decay(q.shape[1], q.device)
        if decay is not None:
            S, z = S * decay.view(1, -1, 1, 1), z * decay.view(1, -1, 1)
        # New tensors rather than in-place updates: callers may keep earlier states.
        S = torch.addcmul(S, k.unsqueeze(-1), v.unsqueeze(-2))
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
        ("state_decay", Optional(Choice(STATE_DECAYS), "none")),
    ])
    RecurrentAttentionRegistry.register(NAME, RecurrentFP32LinearAttention, [
        ("query_dimensions", Int),
        ("feature_map", Optional(Callable)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
        ("state_decay", Optional(Choice(STATE_DECAYS), "none")),
    ])


_register()
