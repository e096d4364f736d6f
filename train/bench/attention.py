"""Causal attention kernels, forward + backward, and recurrent sampling steps.

Parallel (training) form, for each sequence length L:
  (a) library  - fast-transformers' CausalLinearAttention (compiled ``causal_dot_product``,
                 fp32 only); skipped above ``library_max_len`` because it is slow;
  (b) chunked  - this project's ``chunked-causal-linear`` (train.models.attention);
  (c) sdpa     - causal softmax attention, ``F.scaled_dot_product_attention(is_causal=True)``.
(a) and (b) run through their attention modules with an identity feature map on the same
positive inputs, so the comparison is kernel against kernel, normalizer included. On CUDA (b)
and (c) run in bf16 ((b) is then also compared with itself in fp32); (a) is fp32 only.

Recurrent (sampling) form: time per generated token at several positions, for the fixed-size
linear state (RecurrentFP32LinearAttention) against softmax attention over a growing key/value
cache (fast-transformers' RecurrentFullAttention, registry name "full").

Shared cores (CPU): forward + backward of (a) and (b) at one length, idle and then while
other processes keep every core busy (two per core, as other jobs, ranks or loader workers
would), medians of a few runs each: how much each kernel slows when its cores are shared;
(b) also with every slab on all of torch's threads (SLAB_THREADS off): what its choice buys.

Rates are reported against the machine's matmul rate, measured in the same process, so the
numbers read as ratios rather than absolute timings. FLOP counts (per batch entry and head):
  chunked: 3 * 2 * Lp * (C*D + C*M + 2*D*M)  - its matmuls: scores, scores@V, K^T V, Q S
           (dense C x C blocks), forward once and backward twice; Lp = L rounded up to C.
           Also reported: the stricter count with only the causal half of each C x C block,
           3 * 2 * Lp * ((C+1)/2 * (D+M) + 2*D*M);
  library: 3 * 4 * L * D * M                  - state update and read-out per position;
  sdpa:    3 * 2 * L * L * (D + M) / 2        - the causal half of Q K^T and P V.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fast_transformers import causal_product
from fast_transformers.attention.causal_linear_attention import CausalLinearAttention
from fast_transformers.feature_maps.base import ActivationFunctionFeatureMap
from fast_transformers.masking import LengthMask, TriangularCausalMask
from fast_transformers.recurrent.attention.self_attention.full_attention import (
    RecurrentFullAttention,
)

from train.tasks.lm import SequenceModelConfig
from train.models.attention import (
    SLAB_THREADS,
    ChunkedCausalLinearAttention,
    RecurrentFP32LinearAttention,
)

# Inputs are already feature-mapped (positive), so both linear modules get the identity map.
IDENTITY_FEATURE_MAP = ActivationFunctionFeatureMap.factory(lambda x: x)


@dataclass
class Settings:
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    batch: int = 4
    heads: int = 8
    dim: int = 64  # D = M
    # The project's configured default, so the benchmark measures what training runs.
    chunk_size: int = field(
        default_factory=lambda: SequenceModelConfig().attention_chunk_size)
    library_max_len: int = 4096
    repeats: int = 3
    positions: tuple[int, ...] = (128, 1024, 4096)
    step_samples: int = 7
    matmul_size: int = 2048
    time_budget_s: float = 1.0  # fast kernels repeat until this much time is spent
    shared_len: int = 2048  # the shared-cores row: this length,
    busy_per_core: int = 2  # with this many busy processes per core,
    shared_repeats: int = 7  # medians of this many runs


QUICK = Settings(lengths=(64, 128), batch=1, heads=2, dim=16, chunk_size=32,
                 library_max_len=128, repeats=2, positions=(16, 64, 256), step_samples=3,
                 matmul_size=512, time_budget_s=0.05, shared_len=128, busy_per_core=1,
                 shared_repeats=3)


# ---------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn, device, repeats: int, budget_s: float = 0.0) -> list[float]:
    """Wall times in seconds of at least `repeats` calls after one warm-up; fast calls repeat
    until `budget_s` is spent (up to 10x `repeats`)."""
    fn()
    _sync(device)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < budget_s and len(times) < 10 * repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _best_time(fn, device, repeats: int, budget_s: float = 1.0) -> float:
    """The best of _times: fast calls repeat for `budget_s`, so a busy machine's noise fades."""
    return min(_times(fn, device, repeats, budget_s))


class _TensorMemory(TorchDispatchMode):
    """High-water mark of the bytes held by tensors created while active.

    Every op's outputs are noted by storage; a storage counts until it is freed. Scratch memory
    that a kernel allocates and frees internally is not seen (it never becomes a tensor).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self):
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._collect()
        # Views, in-place and out= results share an argument's storage: nothing new.
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in seen and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _peak_mb(fn, device) -> float:
    """Peak MB of tensor memory allocated by one call of fn (outputs and gradients included)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _TensorMemory() as tracker:
        fn()
    return tracker.peak / 2**20


def matmul_rate(device, dtype, size: int, repeats: int = 5, budget_s: float = 1.0) -> float:
    """GFLOP/s of one large square matmul into a preallocated output."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _best_time(lambda: torch.matmul(a, b, out=c), device, repeats, budget_s)
    return 2 * size**3 / seconds / 1e9


# ---------------------------------------------------------------------------- FLOP counts


def chunked_flops(N, H, L, D, M, C) -> float:
    C = min(C, L)
    Lp = math.ceil(L / C) * C
    return 3 * 2 * Lp * (C * D + C * M + 2 * D * M) * N * H


def chunked_flops_causal_half(N, H, L, D, M, C) -> float:
    C = min(C, L)
    Lp = math.ceil(L / C) * C
    return 3 * 2 * Lp * ((C + 1) / 2 * (D + M) + 2 * D * M) * N * H


def library_flops(N, H, L, D, M) -> float:
    return 3 * 4 * L * D * M * N * H


def sdpa_flops(N, H, L, D, M) -> float:
    return 3 * 2 * L * L * (D + M) / 2 * N * H


# ---------------------------------------------------------------------------- kernels


def library_available(device) -> str | None:
    """None when the library kernel can run on this device, else why not."""
    if device.type == "cuda" and causal_product.causal_dot_product_cuda is None:
        return "fast-transformers was built without its CUDA causal_dot_product"
    if device.type not in ("cpu", "cuda"):
        return f"no library kernel for {device.type}"
    return None


def _linear_inputs(N, L, H, D, M, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = F.elu(torch.randn(N, L, H, D, generator=gen)) + 1
    k = F.elu(torch.randn(N, L, H, D, generator=gen)) + 1
    v = torch.randn(N, L, H, M, generator=gen)
    grad = torch.randn(N, L, H, M, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, grad)]


class _LinearCase:
    """One module's forward + backward on fixed inputs; keeps the last outputs for errors."""

    def __init__(self, module, q, k, v, grad):
        N, L = q.shape[:2]
        self.module = module.to(q.device)
        self.inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        self.grad = grad
        self.mask = TriangularCausalMask(L, device=q.device)
        self.lengths = LengthMask(torch.full((N,), L, dtype=torch.long), max_len=L,
                                  device=q.device)
        self.results = None

    def __call__(self):
        q, k, v = self.inputs
        out = self.module(q, k, v, self.mask, self.lengths, self.lengths)
        grads = torch.autograd.grad(out, self.inputs, self.grad)
        self.results = [out.detach(), *grads]


def _sdpa_case(N, L, H, D, M, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1)
    q, k, v, grad = (torch.randn(N, H, L, E, generator=gen).to(device=device, dtype=dtype)
                     for E in (D, D, M, M))
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def run():
        out = F.scaled_dot_product_attention(*inputs, is_causal=True)
        torch.autograd.grad(out, inputs, grad)

    return run


def _rel_err(results, reference) -> float:
    """Worst over output and gradients of max|x - ref| / max|ref|."""
    worst = 0.0
    for x, ref in zip(results, reference):
        ref = ref.double()
        worst = max(worst, ((x.double() - ref).abs().max() / ref.abs().max()).item())
    return worst


def _measure(fn, device, repeats, flops, rate, budget_s) -> dict:
    seconds = _best_time(fn, device, repeats, budget_s)
    gflops = flops / seconds / 1e9
    return {"ms": seconds * 1e3, "gflops": gflops, "frac_of_matmul": gflops / rate,
            "peak_mb": _peak_mb(fn, device)}


def parallel_row(s: Settings, L: int, device, dtype, rate: float) -> dict:
    N, H, D, M, C = s.batch, s.heads, s.dim, s.dim, s.chunk_size
    row: dict = {"L": L}
    q, k, v, grad = _linear_inputs(N, L, H, D, M, device, torch.float32)

    chunked = _LinearCase(ChunkedCausalLinearAttention(D, IDENTITY_FEATURE_MAP,
                                                       causal_chunk_size=C),
                          q.to(dtype), k.to(dtype), v.to(dtype), grad.to(dtype))
    row["chunked"] = _measure(chunked, device, s.repeats, chunked_flops(N, H, L, D, M, C), rate,
                              s.time_budget_s)
    row["chunked"]["frac_of_matmul_causal_half"] = (
        chunked_flops_causal_half(N, H, L, D, M, C) / (row["chunked"]["ms"] / 1e3) / 1e9 / rate)

    why_not = library_available(device)
    if why_not is None and L > s.library_max_len:
        why_not = f"skipped above L={s.library_max_len} (too slow)"
    if why_not is None:
        library = _LinearCase(CausalLinearAttention(D, IDENTITY_FEATURE_MAP), q, k, v, grad)
        row["library"] = _measure(library, device, s.repeats, library_flops(N, H, L, D, M),
                                  rate, s.time_budget_s)
        row["speedup_vs_library"] = row["library"]["ms"] / row["chunked"]["ms"]
        row["rel_err_vs_library"] = _rel_err(chunked.results, library.results)
    else:
        row["library"] = None
        row["library_skipped"] = why_not
        row["speedup_vs_library"] = None
        row["rel_err_vs_library"] = None
    if dtype != torch.float32:
        # Low precision: compare with the same kernel in fp32.
        reference = _LinearCase(ChunkedCausalLinearAttention(D, IDENTITY_FEATURE_MAP,
                                                             causal_chunk_size=C),
                                q, k, v, grad)
        reference()
        row["rel_err_vs_fp32"] = _rel_err(chunked.results, reference.results)

    row["sdpa"] = _measure(_sdpa_case(N, L, H, D, M, device, dtype), device, s.repeats,
                           sdpa_flops(N, H, L, D, M), rate, s.time_budget_s)
    return row


def recurrent_rows(s: Settings, device, dtype) -> list[dict]:
    """Per-token time of one attention step from a state that has seen `position` tokens."""
    N, H, D, M = s.batch, s.heads, s.dim, s.dim
    gen = torch.Generator(device="cpu").manual_seed(2)
    q, k, v = (torch.randn(N, H, E, generator=gen).to(device=device, dtype=dtype)
               for E in (D, D, M))
    linear = RecurrentFP32LinearAttention(D).to(device).eval()
    full = RecurrentFullAttention(attention_dropout=0.0).to(device).eval()
    rows = []
    with torch.no_grad():
        for position in s.positions:
            # The linear state has the same size at every position; the cache grows with it.
            lin_state = [torch.rand(N, H, D, M, device=device) * position,
                         torch.rand(N, H, D, device=device) * position]
            cache = [torch.randn(N, H, position, D, generator=gen).to(device=device, dtype=dtype),
                     torch.randn(N, H, position, M, generator=gen).to(device=device, dtype=dtype)]
            rows.append({
                "position": position,
                "linear_ms": 1e3 * _per_call_time(lambda: linear(q, k, v, state=lin_state),
                                                  device, s.step_samples),
                "full_ms": 1e3 * _per_call_time(lambda: full(q, k, v, state=cache),
                                                device, s.step_samples),
            })
    return rows


def _per_call_time(fn, device, samples: int, block_s: float = 0.01) -> float:
    """Seconds per call of a fast fn: the best of `samples` blocks of back-to-back calls, each
    block long enough (`block_s`) that timer resolution and one-off stalls wash out."""
    fn()
    _sync(device)
    calls = 1
    while True:  # calibrate the block length
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        if time.perf_counter() - start >= block_s or calls >= 1 << 14:
            break
        calls *= 2
    best = math.inf
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


@contextlib.contextmanager
def _busy_processes(n: int):
    """n other processes that each spin on a core for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.2)  # until they run
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def shared_cores_row(s: Settings, device) -> dict | None:
    """Both linear kernels' forward + backward at s.shared_len, idle and on shared cores (CPU);
    the project's also with every slab on all threads (see SLAB_THREADS)."""
    if device.type != "cpu":
        return None
    N, H, D, L = s.batch, s.heads, s.dim, s.shared_len
    q, k, v, grad = _linear_inputs(N, L, H, D, D, device, torch.float32)
    chunked = _LinearCase(ChunkedCausalLinearAttention(
        D, IDENTITY_FEATURE_MAP, causal_chunk_size=s.chunk_size), q, k, v, grad)

    def chunked_on_all_threads():  # without SLAB_THREADS' choice of one thread
        SLAB_THREADS.enabled = False
        try:
            chunked()
        finally:
            SLAB_THREADS.enabled = True

    cases = {"chunked": chunked, "chunked_all_threads": chunked_on_all_threads,
             "library": _LinearCase(CausalLinearAttention(D, IDENTITY_FEATURE_MAP),
                                    q, k, v, grad)}
    busy = s.busy_per_core * len(os.sched_getaffinity(0))
    row = {"L": L, "busy_processes": busy}

    def median_ms(case) -> float:
        return 1e3 * statistics.median(_times(case, device, s.shared_repeats))

    for name, case in cases.items():
        row[name] = {"idle_ms": median_ms(case)}
    with _busy_processes(busy):
        for name, case in cases.items():
            row[name]["shared_ms"] = median_ms(case)
    for name in cases:
        row[name]["slowdown"] = row[name]["shared_ms"] / row[name]["idle_ms"]
    return row


# ---------------------------------------------------------------------------- report


def run(s: Settings, device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = matmul_rate(device, dtype, s.matmul_size, budget_s=s.time_budget_s)
    rows = [parallel_row(s, L, device, dtype, rate) for L in s.lengths]
    recurrent = recurrent_rows(s, device, dtype)
    shared = shared_cores_row(s, device)
    first, last = recurrent[0], recurrent[-1]
    return {
        "benchmark": "attention",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "settings": asdict(s),
        "matmul_gflops": rate,
        "flop_counts": {
            "chunked": "3*2*Lp*(C*D + C*M + 2*D*M)",
            "chunked_causal_half": "3*2*Lp*((C+1)/2*(D+M) + 2*D*M)",
            "library": "3*4*L*D*M",
            "sdpa": "3*2*L*L*(D+M)/2",
        },
        "parallel": rows,
        "shared_cores": shared,
        "recurrent": recurrent,
        "recurrent_growth": {
            "positions": [first["position"], last["position"]],
            "linear": last["linear_ms"] / first["linear_ms"],
            "full": last["full_ms"] / first["full_ms"],
        },
    }


def _fmt(x, spec, width):
    return format(x, spec).rjust(width) if x is not None else "-".rjust(width)


def format_report(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"attention fwd+bwd on {r['device']} ({r['dtype']}, {r['threads']} threads): "
        f"N={s['batch']} H={s['heads']} D=M={s['dim']} chunk={s['chunk_size']}; best of "
        f">= {s['repeats']} runs (fast ones repeat for {s['time_budget_s']:g} s)",
        f"matmul rate ({r['dtype']}, {s['matmul_size']}^2): {r['matmul_gflops']:.1f} GFLOP/s; "
        "frac = kernel GFLOP/s / matmul rate",
        "",
        f"{'L':>6} | {'library ms':>10} {'GF/s':>6} {'frac':>5} {'MB':>6} | "
        f"{'chunked ms':>10} {'GF/s':>6} {'frac':>5} {'MB':>6} | "
        f"{'sdpa ms':>9} {'GF/s':>6} {'frac':>5} {'MB':>6} | {'speedup':>7} {'rel.err':>8}",
    ]
    skipped = []
    for row in r["parallel"]:
        cells = [f"{row['L']:>6}"]
        for name, width in (("library", 10), ("chunked", 10), ("sdpa", 9)):
            m = row[name] or {}
            cells.append(" ".join([_fmt(m.get("ms"), ".1f", width), _fmt(m.get("gflops"), ".1f", 6),
                                   _fmt(m.get("frac_of_matmul"), ".2f", 5),
                                   _fmt(m.get("peak_mb"), ".1f", 6)]))
        speedup = row["speedup_vs_library"]
        cells.append((f"{speedup:.1f}x" if speedup is not None else "-").rjust(7) + " "
                     + _fmt(row["rel_err_vs_library"], ".1e", 8))
        lines.append(" | ".join(cells))
        if row.get("library_skipped"):
            skipped.append(f"L={row['L']}: {row['library_skipped']}")
        if "rel_err_vs_fp32" in row:
            lines[-1] += f"  (vs fp32: {row['rel_err_vs_fp32']:.1e})"
    if skipped:
        lines.append("library not run at " + "; ".join(skipped))
    lines.append("chunked frac counting only the causal half of each chunk's scores: " + ", ".join(
        f"L={row['L']}: {row['chunked']['frac_of_matmul_causal_half']:.2f}"
        for row in r["parallel"]))
    lines += [
        "speedup = library ms / chunked ms; rel.err = max|chunked - library| / max|library|, "
        "worst of output and q/k/v gradients",
        "FLOPs per (batch, head), forward + backward: "
        + "; ".join(f"{k} {v}" for k, v in r["flop_counts"].items()),
        "MB: peak tensor memory allocated during one forward+backward "
        "(outputs and gradients included)",
        "",
    ]
    shared = r.get("shared_cores")
    if shared:
        lines.append(
            f"shared cores, L={shared['L']}, forward+backward, medians: idle -> with "
            f"{shared['busy_processes']} busy processes: " + "; ".join(
                f"{name} {shared[name]['idle_ms']:.1f} -> {shared[name]['shared_ms']:.1f} ms "
                f"({shared[name]['slowdown']:.1f}x)"
                for name in ("chunked", "chunked_all_threads", "library")))
        lines.append("")
    lines += [
        f"recurrent sampling, one attention step per token (N={s['batch']} H={s['heads']} "
        f"D=M={s['dim']}, best of {s['step_samples']} blocks of back-to-back steps):",
        f"{'position':>9} | {'linear ms':>9} | {'full ms':>9}",
    ]
    for row in r["recurrent"]:
        lines.append(f"{row['position']:>9} | {row['linear_ms']:>9.3f} | {row['full_ms']:>9.3f}")
    g = r["recurrent_growth"]
    lines.append(f"per-token cost, position {g['positions'][1]} / position {g['positions'][0]}: "
                 f"linear {g['linear']:.2f}x, full {g['full']:.2f}x")
    return "\n".join(lines)


def main(quick: bool = False, as_json: bool = False) -> int:
    result = run(QUICK if quick else Settings())
    print(json.dumps(result) if as_json else format_report(result), flush=True)
    return 0

