"""One fan-out for everything a user sees: RUN_DIR/metrics.jsonl, the trackers (W&B through
Accelerate) and the progress bar. Only the main process writes."""

from __future__ import annotations

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
        own = torch.Generator().manual_seed(0)  # never draw from (and shift) the training RNG
        a, b = (torch.randn(1024, 1024, generator=own).to(dtype) for _ in range(2))
        torch.matmul(a, b)  # warm-up
        start, reps = time.perf_counter(), 8
        for _ in range(reps):
            torch.matmul(a, b)
        _measured[dtype] = 2 * 1024**3 * reps / (time.perf_counter() - start)
    return _measured[dtype]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
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
