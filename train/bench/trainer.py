"""What the trainer costs over a hand-written loop: `python -m train.bench trainer [--json]`.

For each demo config, the project's loop (`train.loop.train`, with its logging every
`log_every` steps, progress bar, metrics.jsonl and W&B at their defaults) and a bare PyTorch
loop written here for the same model, data, batch and precision run alternately in this
process. Both are timed in windows of `log_every` steps after a warm-up window: the project's
own `step_time_s` (wall time between log points, logging included; evaluation and checkpoint
time are user-configured work and excluded, as the loop excludes them), and the same windows in
the bare loop. Medians over windows and repeats.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from train.tasks import load_config as load

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"lm": ROOT / "configs" / "lm_tiny.yaml", "vision": ROOT / "configs" / "vision_tiny.yaml"}
# A tiny model for --quick (the test suite): same code paths, seconds instead of minutes.
QUICK_OVERRIDES = {
    "lm": ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
           "data.tokenizer=byte", "data.block_size=32", "data.batch_size=8"],
    "vision": ["data.batch_size=16", "data.max_train_samples=256", "data.max_val_samples=64"],
}


def _config(task: str, steps: int, out: Path, quick: bool):
    overrides = [f"output_dir={out}", f"max_steps={steps}", "progress_bar=true", "log_every=10",
                 "wandb.mode=offline", "resume=never",
                 # The user's evaluation is work, not trainer overhead: only the final one runs.
                 "eval_every=1000000", "eval_max_batches=1"]
    if task == "lm":
        overrides.append("lm.sample_tokens=0")
    return load(CONFIGS[task], overrides + (QUICK_OVERRIDES[task] if quick else []))


def _project_loop(task: str, steps: int, quick: bool) -> list[float]:
    """Seconds per step of each logged window but the first (warm-up)."""
    from train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(task, steps, Path(tmp) / "run", quick)
        train(config)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
        return [r["step_time_s"] for r in rows if "loss" in r and r["step"] % 10 == 0][1:]


def _bare_loop(task: str, steps: int, quick: bool) -> list[float]:
    """The loop a user would write by hand: no logging, no checkpoints, no trackers."""
    from train.optim import optimizer_for, schedule_for
    from train.tasks import build_task

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(task, steps, Path(tmp) / "run", quick)
        torch.manual_seed(config.seed)
        task_obj = build_task(config)
        train_set, _ = task_obj.datasets()
        model = task_obj.model()
        device = torch.device("cuda" if torch.cuda.is_available() and config.device != "cpu"
                              else "cpu")
        model.to(device).train()
        optimizer = optimizer_for(model, config.optim)
        scheduler = schedule_for(optimizer, config)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.data.batch_size, shuffle=True, drop_last=True,
            num_workers=config.data.num_workers, collate_fn=task_obj.collate_fn)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        step, batches, windows, start = 0, iter(loader), [], time.perf_counter()
        while step < steps:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if task == "lm":
                    logits = model(batch["input_ids"].to(device))
                    loss = F.cross_entropy(logits.flatten(0, 1).float(),
                                           batch["labels"].to(device).flatten(), ignore_index=-100)
                else:
                    images, labels = batch
                    loss = F.cross_entropy(model(images.to(device)).float(), labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or 1e9)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                loss.item()  # like any loop that prints its loss: waits for the device
                windows.append((time.perf_counter() - start) / 10)
                start = time.perf_counter()
        return windows[1:]


def bench_trainer(quick: bool = False, tasks=("lm", "vision"), repeats: int | None = None
                  ) -> dict:
    steps = 30 if quick else 60
    repeats = repeats or (1 if quick else 3)
    results = {}
    for task in tasks:
        project, bare = [], []
        for _ in range(repeats):  # alternate, so drifts in machine speed hit both alike
            project += _project_loop(task, steps, quick)
            bare += _bare_loop(task, steps, quick)
        p, b = 1 / statistics.median(project), 1 / statistics.median(bare)
        results[task] = {"project_steps_per_s": p, "bare_steps_per_s": b, "ratio": p / b,
                         "repeats": repeats, "windows_timed": len(project)}
    return results


def format_trainer(results: dict) -> str:
    lines = ["task    project steps/s   bare steps/s   ratio (project / bare)"]
    for task, r in results.items():
        lines.append(f"{task:<7} {r['project_steps_per_s']:>15.3f} {r['bare_steps_per_s']:>14.3f}"
                     f"   {r['ratio']:.3f}")
    lines.append("ratio >= 0.95: the trainer costs at most 5% over a hand-written loop")
    return "\n".join(lines)
