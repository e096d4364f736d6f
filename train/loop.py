"""The training loop: one file, read top to bottom. Every task runs through it unchanged.

    config -> Accelerator -> task (data, model, loss) -> loaders -> for each optimizer step:
    wait for data -> forward/backward (x accumulation) -> unscale + clip -> step -> schedule
    -> log (every log_every) -> eval (every eval_every) -> checkpoint (every checkpoint_every)

A step never waits for the device (fp16 aside, see below): whether a step is skipped is decided
on the device, and what the host needs to know is read at log steps, evaluations and checkpoints
only (StepStats).
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
from train.metrics import MetricsLogger, peak_flops, peak_memory_mb, wandb_mode
from train.signals import StopFlag
from train.tasks import build_task


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier per step (LambdaLR). Counted in the loop's steps on every rank: the scheduler
    is stepped once per step, never once per process, and skipped steps count too."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_for(model: torch.nn.Module, cfg, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' 1-D parameters. Fused (one kernel
    for all parameters, on CPU and CUDA): faster, and it can skip a step on the device."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


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
    # One reduce for all sums; a sum may be a vector (e.g. per-class counts).
    flat = accelerator.reduce(torch.cat([sums[k].reshape(-1) for k in keys]), reduction="sum")
    totals = dict(zip(keys, flat.split([sums[k].numel() for k in keys])))
    model.train()
    return task.eval_metrics({k: totals[k].reshape(sums[k].shape).tolist() for k in keys})


def sync_buffers(accelerator, model) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm running stats). DDP copies them only at
    the start of a training forward, so after a step each rank's differ: without this, ranks
    would evaluate slightly different models, and not the one rank 0 checkpoints."""
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer, src=0)


class StoppedBySignal(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was saved and the run stopped early."""


class Diverged(Exception):
    """Too many consecutive steps with a non-finite loss or gradient norm. Noticed when the host
    reads StepStats: at the next log step, evaluation or checkpoint, so never saved as fine."""


def train(config: RunConfig) -> dict[str, float]:
    """Run (or resume) the training described by a validated config; return the last metrics."""
    run_dir = Path(config.output_dir)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible; use device=auto or cpu")
    mode = wandb_mode(config.wandb.mode)
    try:
        accelerator = Accelerator(
            # auto on a machine without CUDA must still mean distributed CPU under torchrun.
            cpu=config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if mode == "disabled" else "wandb",
            dynamo_backend="inductor" if config.compile else "no",
        )
    except ValueError as exc:  # e.g. fp16 requested where the device cannot do it
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}: {exc}") from None
    set_seed(config.seed)  # same seed on every rank: identical initial weights

    # --- task: data and model (nothing has been written yet; bad data input exits cleanly) ---
    task = build_task(config)
    with accelerator.main_process_first():  # build the datasets cache once
        train_set, val_set = task.datasets()
    model = task.model()
    flops_per_sample = task.flops_per_sample(model)
    # Under fp16, Accelerate's GradScaler must see a plain AdamW: with a fused one it hands the
    # skip to the kernel, and Accelerate no longer knows which steps were skipped.
    adamw = optimizer_for(model, config.optim, fused=accelerator.scaler is None)
    schedule = warmup_cosine(config.optim.warmup_steps, config.max_steps, config.optim.min_lr_ratio)
    # Not prepared: Accelerate would step it once per process. Its state travels in loop_state.
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, schedule)
    model, optimizer = accelerator.prepare(model, adamw)  # wraps adamw, the same object

    data = config.data
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(val_set) < world:
        raise ConfigError(f"the validation set has {len(val_set)} samples, fewer than the {world} "
                          "processes; raise data.val_fraction or use fewer processes")
    train_dl = train_loader(train_set, data.batch_size, world, rank, config.seed,
                            data.num_workers, data.pin_memory, task.collate_fn,
                            task.length_grouping)
    val_dl = eval_loader(val_set, data.eval_batch_size, world, rank, data.num_workers,
                         data.pin_memory, task.collate_fn)

    # --- resume, run directory, trackers ---
    state = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "world_size": world,
             "wandb_run_id": uuid.uuid4().hex[:12], "nonfinite_steps": 0}
    resumed = checkpoint.load(accelerator, checkpoint.resume_point(config.resume, run_dir),
                              to_dict(config), config.allow_config_change)
    if resumed is not None:
        start_from, saved = resumed
        scheduler.load_state_dict(saved.pop("scheduler"))
        state.update({k: saved[k] for k in state})  # the saved W&B id: the same run continues
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
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
    peak = peak_flops(accelerator.device, config.mixed_precision)
    metrics = MetricsLogger(accelerator, run_dir, config.max_steps, state["step"],
                            config.progress_bar)
    if resumed is not None:
        metrics.write(f"resumed from {start_from} at step {state['step']}")
        if state["world_size"] != world:
            metrics.write(f"data order re-sharded from {state['world_size']} to {world} "
                          "processes (it follows the global sample index, so none is repeated)")
    state["world_size"] = world
    metrics.write(f"{world} process(es) on {accelerator.device}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"{len(train_set):,} train / {len(val_set):,} val samples")

    # --- the loop ---
    batches = batches_forever(train_dl, state["epoch"], state["samples_in_epoch"])
    accum = config.gradient_accumulation_steps
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    zero = torch.zeros((), device=accelerator.device)
    stats = StepStats(accelerator.device, state["nonfinite_steps"])
    data_wait, window_start, window_steps, fp16_skipped = 0.0, time.perf_counter(), 0, 0
    last: dict[str, float] = {}
    stop, stopped = StopFlag().install(), False
    model.train()
    for step in range(state["step"] + 1, config.max_steps + 1):
        step_loss = zero.clone()
        for _ in range(accum):
            t0 = time.perf_counter()
            epoch, consumed, batch = next(batches)
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
            data_wait += time.perf_counter() - t0
            with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                loss, batch_counters = task.loss(model, batch)
                accelerator.backward(loss)  # divides by the accumulation steps
            step_loss += loss.detach()
            stats.count(batch_counters)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)  # unscales first
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
        if accelerator.scaler is None:
            # A non-finite step must not reach the weights, and the host must not wait to know:
            # fused AdamW takes `found_inf` as GradScaler would hand it over, and where it is 1
            # leaves weights, moments and step count as they were, on the device.
            adamw.found_inf = (~finite).float()
            optimizer.step()
            applied, bad = finite, ~finite
        else:
            # fp16: GradScaler (inside Accelerate) reads its overflow flag on the host, a sync
            # every step, and skips overflowing steps itself; only a non-finite loss is bad.
            optimizer.step()
            skipped = accelerator.optimizer_step_was_skipped
            fp16_skipped += skipped
            applied, bad = torch.full_like(finite, not skipped), ~torch.isfinite(step_loss)
        # Every step advances the schedule, skipped or not: a step's learning rate depends on its
        # number only (a resumed run recomputes the same), and the host needs nothing from the
        # device to know it.
        scheduler.step()
        stats.add_step(step, step_loss, grad_norm.detach(), applied, bad)
        optimizer.zero_grad(set_to_none=True)
        state.update(step=step, epoch=epoch, samples_in_epoch=consumed)
        window_steps += 1
        metrics.advance()

        stopped = stop.should_stop() and step < config.max_steps
        log_now = step % config.log_every == 0 or step == config.max_steps
        eval_now = step % config.eval_every == 0 or step == config.max_steps
        save_now = step % config.checkpoint_every == 0 or step == config.max_steps or stopped
        if log_now or eval_now or save_now:
            # The host reads the device's step statistics here only: to log, and so that no
            # evaluation or checkpoint comes after a diverged step as if it were fine.
            seen = stats.read(accelerator)
            state["nonfinite_steps"] = seen["bad"]
            if seen["worst_run"] >= config.max_nonfinite_steps:
                stop.restore()
                metrics.close()
                accelerator.end_training()  # the W&B run is closed, not left dangling
                end, good = seen["worst_run_end"], checkpoint.latest_checkpoint(run_dir)
                raise Diverged(f"loss or gradient norm not finite for {seen['worst_run']} steps in "
                               f"a row (steps {end - seen['worst_run'] + 1} to {end}); "
                               + (f"the last good checkpoint is {good}" if good else
                                  "no checkpoint was saved")
                               + ". Lower optim.lr, set optim.grad_clip, or check the data")

        if log_now:
            # After the read: on a GPU the window's time then includes all of its device work.
            elapsed = time.perf_counter() - window_start
            applied_steps = max(seen["applied"], 1)
            samples = window_steps * accum * data.batch_size * world
            last = {"loss": seen["loss_sum"] / (applied_steps * accum),
                    "lr": scheduler.get_last_lr()[0], "grad_norm": seen["norm_sum"] / applied_steps,
                    "step_time_s": elapsed / window_steps, "samples_per_s": samples / elapsed,
                    **{f"{k}_per_s": v / elapsed for k, v in seen["counters"].items()},
                    "data_wait_frac": data_wait / elapsed, "fp16_skipped_steps": fp16_skipped,
                    "nonfinite_steps": state["nonfinite_steps"], "epoch": epoch,
                    "peak_mem_mb": peak_memory_mb(accelerator.device)}
            last["model_tflops_per_s"] = flops_per_sample * last["samples_per_s"] / 1e12
            if peak is not None:  # model FLOPs utilization, over every process's device
                last["mfu"] = last["model_tflops_per_s"] * 1e12 / (peak * world)
            metrics.log(step, last)
            stats.new_window()
            data_wait, window_start, window_steps = 0.0, time.perf_counter(), 0

        paused_at = time.perf_counter()  # eval and checkpoint time is not training throughput
        if eval_now:
            sync_buffers(accelerator, model)
            results = evaluate(accelerator, task, accelerator.unwrap_model(model), val_dl,
                               config.eval_max_batches)
            extras = {}
            if accelerator.is_main_process:
                extras = task.eval_extras(accelerator.unwrap_model(model), step)
                model.train()
            metrics.log(step, results, extras)
            last.update(results)

        if save_now:
            checkpoint.save(accelerator, run_dir, {**state, "scheduler": scheduler.state_dict(),
                                                   "config": to_dict(config)},
                            config.keep_checkpoints)
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
