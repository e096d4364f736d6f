"""One fan-out for everything a user sees: RUN_DIR/metrics.jsonl, the trackers (W&B through
Accelerate) and the progress bar. Only the main process writes."""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def wandb_mode(requested: str) -> str:
    """`auto` means online only when credentials exist; otherwise runs stay offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


# Dense peak TFLOP/s per device, from vendor datasheets, by name fragment and mixed_precision
# ("no" = fp32 without TF32, PyTorch's default for matmuls). SXM parts; others are lower.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "no": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "no": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "no": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "no": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "no": 30.3},
}
_measured: dict = {}


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """FLOP/s one device can do at best: the datasheet for known GPUs; on CPU, a matmul
    measured here in the training dtype (the rate this machine really reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, table in PEAK_TFLOPS.items():
            if fragment in name:
                return table[mixed_precision] * 1e12
        return None
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    if dtype not in _measured:
        _measured[dtype] = _measure_matmul(dtype)
    return _measured[dtype]


def _measure_matmul(dtype: torch.dtype, budget_s: float = 0.3) -> float:
    """FLOP/s of square matmuls, growing the size (up to 1024) while one call stays under a
    fortieth of the budget: a CPU without native bf16 runs it ~100x slower than fp32, and a
    fixed 1024 x 1024 measurement would cost half a minute there."""
    own = torch.Generator().manual_seed(0)  # never draw from (and shift) the training RNG
    n, rate = 128, 0.0
    while True:
        a, b = (torch.randn(n, n, generator=own).to(dtype) for _ in range(2))
        torch.matmul(a, b)  # warm-up
        start, reps = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < budget_s / 4 or reps < 2:
            torch.matmul(a, b)
            reps += 1
        rate = max(rate, 2 * n**3 * reps / elapsed)
        if n >= 1024 or elapsed / reps > budget_s / 40:
            return rate
        n *= 2


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: the latter survives
    execve, so a process started by a big one reports its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a run killed after its last checkpoint trains those steps
    again on resume, and each step must appear once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, accelerator, run_dir: Path, total_steps: int, start_step: int,
                 progress_bar: bool):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        path = Path(run_dir) / "metrics.jsonl"
        if self.main:
            truncate_after(path, start_step)
        self.file = open(path, "a") if self.main else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (self.main and progress_bar), file=sys.stderr)

    def log(self, step: int, values: dict[str, Any], extras: dict[str, Any] | None = None) -> None:
        """`values` are numbers; `extras` (text, images) go to the trackers, and strings also to
        the jsonl line."""
        if not self.main:
            return
        extras = extras or {}
        line = {"step": step, **values, **{k: v for k, v in extras.items() if isinstance(v, str)}}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.accelerator.trackers:
            self.accelerator.log({**values, **_for_trackers(extras, step)}, step=step)
        shown = {k: v for k, v in values.items() if k in ("loss", "val/loss", "val/bpb", "lr")}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, message: str) -> None:
        if self.main:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def _for_trackers(extras: dict[str, Any], step: int) -> dict[str, Any]:
    if not extras:
        return {}
    import wandb

    out = {}
    for key, value in extras.items():
        if isinstance(value, str):
            out[key] = wandb.Table(columns=["step", key], data=[[step, value]])
        else:
            out[key] = value  # already a tracker object (e.g. wandb.Image)
    return out


class StepStats:
    """What the loop records about its steps, kept on the device so that no step waits for it;
    read (one transfer) at log steps and before evaluations and checkpoints.

    An *applied* step changed the weights. A *bad* one had a non-finite loss or gradient norm:
    without fp16 those are exactly the skipped steps; under fp16 the grad scaler also skips
    steps whose gradients overflowed, which is routine (it lowers its scale), not bad.
    """

    def __init__(self, device: torch.device, bad_before: int = 0):
        self.zero = torch.zeros((), device=device)
        self.bad_run = self.zero.clone()  # bad steps in a row up to now, across windows
        self.bad = self.zero + bad_before  # bad steps of the whole run (a resumed one too)
        self.fp16_skipped = 0  # known on the host: the grad scaler reads its flag every step
        self.new_window()

    def new_window(self) -> None:
        self.loss_sum, self.norm_sum = self.zero.clone(), self.zero.clone()  # over applied steps
        self.applied = self.zero.clone()
        self.worst_run, self.worst_run_end = self.zero.clone(), self.zero.clone()  # and its step
        self.counters: dict[str, torch.Tensor] = {}  # the task's (images, tokens, ...)

    def count(self, batch_counters: dict[str, torch.Tensor]) -> None:
        for key, value in batch_counters.items():
            self.counters[key] = self.counters.get(key, 0) + value

    def add_step(self, step: int, loss, grad_norm, applied, bad) -> None:
        self.loss_sum += torch.where(applied, loss, 0)  # a skipped step's may be NaN
        self.norm_sum += torch.where(applied, grad_norm, 0)
        self.applied += applied
        self.bad += bad
        self.bad_run = (self.bad_run + 1) * bad
        self.worst_run_end = torch.where(self.bad_run > self.worst_run, step, self.worst_run_end)
        self.worst_run = torch.maximum(self.worst_run, self.bad_run)

    def read(self, accelerator) -> dict:
        """The window so far, over all ranks: sums, and maxima of the bad-step counts (`bad`
        counts the whole run)."""
        keys = sorted(self.counters)  # the same on every rank
        local = torch.stack([self.loss_sum, self.norm_sum, self.applied, self.bad, self.worst_run,
                             self.worst_run_end, *(self.counters[k].float() for k in keys)])
        rows = accelerator.gather(local[None]).tolist()  # the host waits for the device here
        total, most = [sum(col) for col in zip(*rows)], [max(col) for col in zip(*rows)]
        return {"loss_sum": total[0], "norm_sum": total[1], "applied": total[2],
                "bad": int(most[3]), "worst_run": int(most[4]), "worst_run_end": int(most[5]),
                "counters": dict(zip(keys, total[6:]))}


class WindowTimer:
    """Wall time of the current log window, less its pauses (evaluations and checkpoints are
    not training throughput), and how much of it was spent waiting for data."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

    @contextlib.contextmanager
    def waiting_for_data(self):
        t0 = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - t0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        yield
        self.start += time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def training_record(seen: dict, timer: WindowTimer, *, lr: float, samples_per_step: int,
                    accumulation: int, flops_per_sample: float | None, peak: float | None,
                    world: int, fp16_skipped: int, epoch: int, device: torch.device) -> dict:
    """The metrics.jsonl line of a log step, from a StepStats window and its timer. Taken after
    the read: on a GPU the window's time then includes all of its device work."""
    elapsed = timer.elapsed()
    applied = max(seen["applied"], 1)
    samples = timer.steps * samples_per_step
    record = {"loss": seen["loss_sum"] / (applied * accumulation), "lr": lr,
              "grad_norm": seen["norm_sum"] / applied, "step_time_s": elapsed / timer.steps,
              "samples_per_s": samples / elapsed,
              **{f"{k}_per_s": v / elapsed for k, v in seen["counters"].items()},
              "data_wait_frac": timer.data_wait / elapsed, "fp16_skipped_steps": fp16_skipped,
              "nonfinite_steps": seen["bad"], "epoch": epoch,
              "peak_mem_mb": peak_memory_mb(device)}
    if flops_per_sample is not None:  # None: the model has a part without a FLOPs formula
        record["model_tflops_per_s"] = flops_per_sample * record["samples_per_s"] / 1e12
        if peak is not None:  # model FLOPs utilization, over every process's device
            record["mfu"] = record["model_tflops_per_s"] * 1e12 / (peak * world)
    return record
