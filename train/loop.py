"""The training loop: one file, read top to bottom. Every task runs through it unchanged.

    config -> Accelerator -> task (data, model, loss) -> loaders -> for each optimizer step:
    wait for data -> forward/backward (x accumulation) -> unscale + clip -> step -> schedule
    -> log (every log_every) -> eval (every eval_every) -> checkpoint (every checkpoint_every)
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed

from train import checkpoint
from train.config import ConfigError, RunConfig, save as save_config, to_dict
from train.data.loaders import batches_forever, eval_loader, train_loader
from train.metrics import MetricsLogger, peak_memory_mb, wandb_mode
from train.signals import StopFlag
from train.tasks import build_task


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier per optimizer step (LambdaLR). Counted in optimizer steps on every rank:
    the scheduler is stepped once per optimizer step, never once per process."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_for(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(accelerator, task, model, loader, max_batches: int | None) -> dict[str, float]:
    """Exact over the whole validation set: per-rank sums, then one sum-reduce across ranks."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            batch_sums = task.eval_sums(model, send_to_device(batch, accelerator.device))
        for key, value in batch_sums.items():
            sums[key] = sums.get(key, 0) + value.detach().double()
    keys = sorted(sums)  # same keys on every rank: each has at least one batch (checked in train)
    total = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
    model.train()
    return task.eval_metrics({k: v.item() for k, v in zip(keys, total)})


class StoppedBySignal(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was saved and the run stopped early."""


def train(config: RunConfig) -> dict[str, float]:
    """Run (or resume) the training described by a validated config; return the last metrics."""
    run_dir = Path(config.output_dir)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible; use device=auto or cpu")
    mode = wandb_mode(config.wandb.mode)
    accelerator = Accelerator(
        cpu=config.device == "cpu",
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if mode == "disabled" else "wandb",
    )
    set_seed(config.seed)  # same seed on every rank: identical initial weights

    # --- task: data and model (nothing has been written yet; bad data input exits cleanly) ---
    task = build_task(config)
    with accelerator.main_process_first():  # build the datasets cache once
        train_set, val_set = task.datasets()
    model = task.model()
    optimizer = optimizer_for(model, config.optim)
    schedule = warmup_cosine(config.optim.warmup_steps, config.max_steps, config.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler is not prepared (Accelerate would step it once per process); it is
    # registered so that save_state/load_state carry it.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    data = config.data
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(val_set) < world:
        raise ConfigError(f"the validation set has {len(val_set)} samples, fewer than the {world} "
                          "processes; raise data.val_fraction or use fewer processes")
    train_dl = train_loader(train_set, data.batch_size, world, rank, config.seed,
                            data.num_workers, data.pin_memory, task.collate_fn)
    val_dl = eval_loader(val_set, data.eval_batch_size, world, rank, data.num_workers,
                         data.pin_memory, task.collate_fn)

    # --- run directory, resume, trackers ---
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "wandb_run_id": None}
    start_from = checkpoint.resume_point(config.resume, run_dir)
    if start_from is not None:
        state = checkpoint.load(accelerator, start_from)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if state["wandb_run_id"] is None:  # kept in checkpoints: a resumed run logs to the same id
        state["wandb_run_id"] = uuid.uuid4().hex[:12]
    if mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")  # our own line below says where it went
        wandb_kwargs = dict(dir=str(run_dir), mode=mode, id=state["wandb_run_id"], resume="allow",
                            name=config.wandb.name or run_dir.name, entity=config.wandb.entity,
                            tags=config.wandb.tags)
        accelerator.init_trackers(config.wandb.project, config=to_dict(config),
                                  init_kwargs={"wandb": wandb_kwargs})
        if accelerator.is_main_process:
            run = accelerator.get_tracker("wandb", unwrap=True)
            local = Path(run.dir).parent
            where = run.url if mode == "online" else f"{local} (upload later: wandb sync {local})"
            print(f"W&B {mode} run {state['wandb_run_id']}: {where}", file=sys.stderr)
    metrics = MetricsLogger(accelerator, run_dir, config.max_steps, state["step"],
                            config.progress_bar)
    if start_from is not None:
        metrics.write(f"resumed from {start_from} at step {state['step']}")
    metrics.write(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"{len(train_set):,} train / {len(val_set):,} val samples")

    # --- the loop ---
    batches = batches_forever(train_dl, state["epoch"], state["batch_in_epoch"])
    accum = config.gradient_accumulation_steps
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    zero = torch.zeros((), device=accelerator.device)
    loss_sum, norm_sum, counters = zero.clone(), zero.clone(), {}
    data_wait, skipped, window_start, window_steps = 0.0, 0, time.perf_counter(), 0
    last: dict[str, float] = {}
    stop, stopped = StopFlag().install(), False
    model.train()
    for step in range(state["step"] + 1, config.max_steps + 1):
        for _ in range(accum):
            t0 = time.perf_counter()
            epoch, batch_index, batch = next(batches)
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
            data_wait += time.perf_counter() - t0
            with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                loss, batch_counters = task.loss(model, batch)
                accelerator.backward(loss)  # divides by the accumulation steps
            loss_sum += loss.detach()
            for key, value in batch_counters.items():
                counters[key] = counters.get(key, 0) + value
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)  # unscales first
        optimizer.step()
        if accelerator.optimizer_step_was_skipped:  # fp16 overflow: scaler lowered its scale
            skipped += 1
        else:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        norm_sum += grad_norm.detach()
        state.update(step=step, epoch=epoch, batch_in_epoch=batch_index + 1)
        window_steps += 1
        metrics.advance()

        if step % config.log_every == 0 or step == config.max_steps:
            # The only host syncs of the loop: once per log interval.
            elapsed = time.perf_counter() - window_start
            local = torch.stack([loss_sum / (window_steps * accum), norm_sum / window_steps])
            mean_loss, mean_norm = accelerator.reduce(local, reduction="mean").tolist()
            totals = {k: accelerator.reduce(v.detach().float(), reduction="sum").item()
                      for k, v in sorted(counters.items())}
            samples = window_steps * accum * data.batch_size * world
            last = {"loss": mean_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": mean_norm,
                    "step_time_s": elapsed / window_steps, "samples_per_s": samples / elapsed,
                    **{f"{k}_per_s": v / elapsed for k, v in totals.items()},
                    "data_wait_frac": data_wait / elapsed, "skipped_steps": skipped,
                    "epoch": epoch, "peak_mem_mb": peak_memory_mb(accelerator.device)}
            metrics.log(step, last)
            loss_sum, norm_sum, counters = zero.clone(), zero.clone(), {}
            data_wait, window_start, window_steps = 0.0, time.perf_counter(), 0

        paused_at = time.perf_counter()  # eval and checkpoint time is not training throughput
        if step % config.eval_every == 0 or step == config.max_steps:
            results = evaluate(accelerator, task, accelerator.unwrap_model(model), val_dl,
                               config.eval_max_batches)
            extras = {}
            if accelerator.is_main_process:
                extras = task.eval_extras(accelerator.unwrap_model(model), step)
                model.train()
            metrics.log(step, results, extras)
            last.update(results)

        stopped = stop.should_stop() and step < config.max_steps
        if step % config.checkpoint_every == 0 or step == config.max_steps or stopped:
            checkpoint.save(accelerator, run_dir, state, config.keep_checkpoints)
        if stopped:
            metrics.write(f"stop signal received: saved step {step}; run again to resume")
            break
        window_start += time.perf_counter() - paused_at

    stop.restore()
    metrics.close()
    accelerator.end_training()
    if stopped:
        raise StoppedBySignal(f"stopped at step {state['step']} of {config.max_steps}")
    return last
