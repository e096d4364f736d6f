"""The training loop: one file, read top to bottom. Every task runs through it unchanged.

    train(): set up (accelerator, task, data, model, resume, outputs) -> for each optimizer step:
    train_step (data -> forward/backward x accumulation -> unscale + clip -> step -> schedule)
    -> log (every log_every) -> evaluate (every eval_every) -> checkpoint (every checkpoint_every,
    and on a stop signal) -> teardown, once, on every exit path.

A step never waits for the device (fp16 aside, see train_step): whether a step is skipped is
decided on the device, and what the host needs to know is read at log steps, evaluations and
checkpoints only (StepStats).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import send_to_device, set_seed

from train import checkpoint, faults
from train.config import AUTO_EVAL_BATCHES, RunConfig, read_as, save as save_config, to_dict
from train.data.loaders import TrainBatches, eval_loader, train_loader
from train.errors import (EXIT_BUG, ConfigError, Diverged, MainProcessFailed, StoppedBySignal,
                          as_user_error)
from train.launch import note_stopped
from train.metrics import (MetricsLogger, StepStats, WindowTimer, peak_flops, training_record,
                           wandb_mode)
from train.optim import make_ema, optimizer_for, schedule_for, update_ema
from train.signals import StopFlag
from train.tasks import Task, build_task


def train(config: RunConfig) -> dict[str, float]:
    """Run (or resume) the training described by a validated config; return the last metrics."""
    with contextlib.ExitStack() as teardown:  # signal handlers, metrics file, trackers: always
        run = set_up(config, teardown)
        stats = StepStats(run.accelerator.device, run.state["nonfinite_steps"])
        timer, last = WindowTimer(), {}
        for step in range(run.state["step"] + 1, config.max_steps + 1):
            train_step(run, stats, timer, step)
            run.state.update(step=step, **run.batches.position())
            run.metrics.advance()
            faults.after_step(step, run.accelerator.process_index, run.stop)

            stopped = run.stop.should_stop() and step < config.max_steps
            final = step == config.max_steps
            log_now = step % config.log_every == 0 or final
            eval_now = step % config.eval_every == 0 or final
            save_now = step % config.checkpoint_every == 0 or final or stopped
            if log_now or eval_now or save_now:
                # The host reads the device's step statistics here only: to log, and so that no
                # evaluation or checkpoint comes after a diverged step as if it were fine.
                seen = read_stats(run, stats)
            if log_now:
                last = training_record(
                    seen, timer, lr=run.scheduler.get_last_lr()[0], samples_per_step=(
                        config.gradient_accumulation_steps * config.data.batch_size
                        * run.accelerator.num_processes),
                    accumulation=config.gradient_accumulation_steps,
                    flops_per_sample=run.flops_per_sample, peak=run.peak,
                    world=run.accelerator.num_processes, fp16_skipped=stats.fp16_skipped,
                    epoch=run.state["epoch"], device=run.accelerator.device)
                run.metrics.log(step, last)
                stats.new_window()
                timer.reset()
            with timer.paused():
                if eval_now:
                    last.update(evaluate_and_log(run, step))
                if save_now:
                    checkpoint.save(run.accelerator, run.run_dir, {
                        **run.state, "scheduler": run.scheduler.state_dict(),
                        "config": to_dict(config)}, config.keep_checkpoints, run_files(run.task),
                        run.batches.stream_state())
            if stopped:
                message = (f"stopped at step {step} of {config.max_steps}; a checkpoint was "
                           "saved, run the same command to resume")
                run.metrics.write(f"stop signal received: saved step {step}; run again to resume")
                if run.accelerator.is_main_process:
                    note_stopped(message)  # for train.launch, which exits 3 on it
                raise StoppedBySignal(message, quiet=not run.accelerator.is_main_process)
        return last


@dataclass
class Run:
    """Everything set_up made, for the steps of the loop."""

    config: RunConfig
    accelerator: Accelerator
    task: Task
    model: torch.nn.Module  # prepared (wrapped by DDP/FSDP when distributed)
    torch_optimizer: torch.optim.Optimizer  # AdamW or SGD; `optimizer` is Accelerate's wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.optim.swa_utils.AveragedModel | None  # the weights' moving average, if any
    batches: TrainBatches  # the training data from where the run stands
    val_dl: torch.utils.data.DataLoader
    state: dict  # what a checkpoint saves besides Accelerate's state
    run_dir: Path
    metrics: MetricsLogger
    stop: StopFlag
    flops_per_sample: float | None
    peak: float | None


def set_up(config: RunConfig, teardown: contextlib.ExitStack) -> Run:
    """Accelerator, task, data, model and optimizer, the resumed state, the run directory and
    trackers. Bad input is found before anything is written; teardown gets what to undo."""
    check_output_dir(Path(config.output_dir))
    accelerator = make_accelerator(config)
    if config.deterministic:  # bitwise-repeatable kernels, where PyTorch has them
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        teardown.callback(torch.use_deterministic_algorithms, False)
    teardown.push(lambda kind, exc, tb: end_training(accelerator, kind))
    set_seed(config.seed)  # same seed on every rank: identical initial weights

    task = build_task(config)
    with main_process_first(accelerator):  # build the datasets cache once
        train_set, val_set = task.datasets()
    model = task.model()
    flops_per_sample = task.flops_per_sample(model)  # of the bare model, before any wrapping
    # Under fp16, Accelerate's GradScaler must see a plain optimizer: with a fused one it hands
    # the skip to the kernel, and Accelerate no longer knows which steps were skipped.
    torch_optimizer = optimizer_for(model, config.optim, fused=accelerator.scaler is None)
    # Not prepared: Accelerate would step it once per process. Its state travels in loop_state.
    scheduler = schedule_for(torch_optimizer, config)
    model, optimizer = accelerator.prepare(model, torch_optimizer)  # wraps it, the same object
    ema = make_ema(accelerator.unwrap_model(model, keep_torch_compile=False), config.ema)
    if ema is not None:
        if accelerator.is_fsdp2 or accelerator.distributed_type.name == "FSDP":
            raise ConfigError("ema.decay needs the whole model on every process, and FSDP shards "
                              "it: set ema.decay=0 or train with DDP")
        accelerator.register_for_checkpointing(ema)  # saved and restored with the rest

    train_dl, val_dl = make_loaders(config, accelerator, task, train_set, val_set)
    run_dir, world = Path(config.output_dir), accelerator.num_processes
    state, resumed_from, stream_state = resume(config, accelerator, model, scheduler, run_dir,
                                               streaming=not hasattr(train_set, "__len__"))
    batches = TrainBatches(train_dl, state["epoch"], state["samples_in_epoch"], stream_state)
    teardown.callback(batches.close)

    # From here on the run directory is written.
    if accelerator.is_main_process:
        if warning := checkpoint.space_warning(run_dir, model, config.keep_checkpoints):
            print(warning, file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        for name, path in run_files(task).items():  # e.g. a tokenizer trained for this run
            if Path(path).resolve() != (run_dir / name).resolve():
                shutil.copyfile(path, run_dir / name)
    start_trackers(config, accelerator, run_dir, state["wandb_run_id"])
    metrics = MetricsLogger(accelerator, run_dir, config.max_steps, state["step"],
                            config.progress_bar)
    teardown.callback(metrics.close)
    if resumed_from is not None:
        metrics.write(f"resumed from {resumed_from} at step {state['step']}")
        if state["world_size"] != world:
            metrics.write(f"data order re-sharded from {state['world_size']} to {world} "
                          "processes (it follows the global sample index, so none is repeated)")
    state["world_size"] = world
    metrics.write(f"{world} process(es) on {accelerator.device}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, "
                  + (f"{len(train_set):,} train" if hasattr(train_set, "__len__") else
                     "a training stream") + f" / {len(val_set):,} val samples"
                  + ("" if flops_per_sample is not None else
                     "; MFU unknown (no FLOPs formula for a part of this model)"))
    stop = StopFlag().install()
    teardown.callback(stop.restore)
    model.train()
    return Run(config, accelerator, task, model, torch_optimizer, optimizer, scheduler, ema,
               batches, val_dl, state, run_dir, metrics, stop, flops_per_sample,
               peak_flops(accelerator.device, config.mixed_precision))


@contextlib.contextmanager
def main_process_first(accelerator: Accelerator):
    """The main process runs the block first, then the others. Unlike Accelerate's, a failure
    of the main process reaches the others as its exit status (MainProcessFailed), instead of
    leaving them on a barrier that breaks when it exits and reads as a crash of their own."""
    if accelerator.num_processes == 1:
        yield
        return
    status = torch.zeros((), dtype=torch.int32, device=accelerator.device)
    if accelerator.is_main_process:
        try:
            yield
        except BaseException as exc:
            error = as_user_error(exc)
            status.fill_(error.exit_code if error else EXIT_BUG)
            torch.distributed.broadcast(status, src=0)
            raise
        torch.distributed.broadcast(status, src=0)
    else:
        torch.distributed.broadcast(status, src=0)  # waits for the main process's outcome
        if status.item():
            raise MainProcessFailed(int(status.item()))
        yield


def run_files(task: Task) -> dict[str, Path]:
    """Files the task made for this run (e.g. a trained tokenizer): kept in the run directory
    and in every checkpoint, so that the run and each checkpoint are complete on their own."""
    return getattr(task, "run_files", {})


def make_loaders(config: RunConfig, accelerator: Accelerator, task: Task, train_set, val_set):
    """The sharded, resumable training loader and the exact evaluation loader."""
    data, world, rank = config.data, accelerator.num_processes, accelerator.process_index
    if len(val_set) < world:
        raise ConfigError(f"the validation set has {len(val_set)} samples, fewer than the {world} "
                          "processes; raise data.val_fraction or use fewer processes")
    train_dl = train_loader(train_set, data.batch_size, world, rank, config.seed,
                            data.num_workers, data.pin_memory, task.collate_fn,
                            task.length_grouping, getattr(task, "sample_repeats", 1))
    val_dl = eval_loader(val_set, data.eval_batch_size, world, rank, data.num_workers,
                         data.pin_memory, task.collate_fn)
    return train_dl, val_dl


def resume(config: RunConfig, accelerator: Accelerator, model, scheduler, run_dir: Path,
           streaming: bool):
    """(loop state, the checkpoint it was restored from or None, this rank's stream position
    or None). Restores the model, optimizer, grad scaler and RNG states (Accelerate) and the
    schedule in place."""
    state = {"step": 0, "epoch": 0, "samples_in_epoch": 0,
             "world_size": accelerator.num_processes,
             "wandb_run_id": uuid.uuid4().hex[:12], "nonfinite_steps": 0}
    resumed = checkpoint.load(accelerator, checkpoint.resume_point(config.resume, run_dir),
                              to_dict(config), config.allow_config_change,
                              accelerator.unwrap_model(model), partial(read_as, config))
    if resumed is None:
        return state, None, None
    saved = resumed[1]
    scheduler.load_state_dict(saved.pop("scheduler"))
    state.update({k: saved[k] for k in state})  # the saved W&B id: the same run continues
    stream_state = None
    if streaming:
        if state["world_size"] != accelerator.num_processes:
            raise ConfigError(f"a streaming run resumes on the processes it ran on: {resumed[0]} "
                              f"was saved by {state['world_size']}, this run has "
                              f"{accelerator.num_processes}")
        stream_state = checkpoint.load_stream_state(resumed[0], accelerator.process_index)
    return state, resumed[0], stream_state


def check_output_dir(run_dir: Path) -> None:
    """Bad input before any work: output_dir must be a directory this process can write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir={str(run_dir)!r} is a file, not a directory; choose "
                          "another output_dir")
    existing = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={str(run_dir)!r}: {existing} is not writable (read-only "
                          "filesystem or no permission); choose another output_dir")


def make_accelerator(config: RunConfig) -> Accelerator:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible; use device=auto or cpu")
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if cpu and config.mixed_precision == "fp16":
        # Accelerate would accept it and train in fp32: refuse rather than run something else.
        raise ConfigError("mixed_precision=fp16 needs a CUDA device; on CPU use bf16 or no")
    # Accelerate keeps its settings (precision, compile backend) in process-wide singletons that
    # the first Accelerator of a process fixes: each train() (benchmarks and tests run several
    # in one process) must get the ones its own config asks for.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return Accelerator(
            cpu=cpu,  # auto on a machine without CUDA must still mean distributed CPU (torchrun)
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if wandb_mode(config.wandb.mode) == "disabled" else "wandb",
            dynamo_backend="inductor" if config.compile else "no",
        )
    except ValueError as exc:  # e.g. a precision the device cannot do
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}: {exc}") from None


def end_training(accelerator: Accelerator, exception: type | None) -> None:
    """Close the trackers (the W&B run) and the process group. After a normal end or a stop,
    the ranks leave together: a launcher that sees one rank exit stops the others, which must
    not happen while the main process is still closing the W&B run."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if exception is None or issubclass(exception, StoppedBySignal):
        accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()


def start_trackers(config: RunConfig, accelerator: Accelerator, run_dir: Path,
                   run_id: str) -> None:
    mode = wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return
    os.environ.setdefault("WANDB_SILENT", "true")  # our own line below says where it went
    # The config goes to wandb.init, so it is part of the run's first record. (Accelerate's
    # `config=` would update the module-global `wandb.config` in a second record afterwards.)
    wandb_kwargs = dict(dir=str(run_dir), mode=mode, id=run_id, resume="allow",
                        name=config.wandb.name or run_dir.name, entity=config.wandb.entity,
                        tags=config.wandb.tags, config=to_dict(config))
    accelerator.init_trackers(config.wandb.project, init_kwargs={"wandb": wandb_kwargs})
    if accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        local = Path(run.dir).parent
        where = run.url if mode == "online" else f"{local} (upload later: wandb sync {local})"
        print(f"W&B {mode} run {run_id}: {where}", file=sys.stderr)


def train_step(run: Run, stats: StepStats, timer: WindowTimer, step: int) -> None:
    """One optimizer step over gradient_accumulation_steps micro-batches."""
    accelerator, model = run.accelerator, run.model
    step_loss = torch.zeros((), device=accelerator.device)
    for _ in range(run.config.gradient_accumulation_steps):
        with timer.waiting_for_data():
            batch = next(run.batches)
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
            loss, batch_counters = run.task.loss(model, batch)
            loss = faults.poisoned(loss, step)
            accelerator.backward(loss)  # divides by the accumulation steps
        step_loss += loss.detach()
        stats.count(batch_counters)
    clip = run.config.optim.grad_clip or float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)  # unscales first
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    if accelerator.scaler is None:
        # A non-finite step must not reach the weights, and the host must not wait to know:
        # fused AdamW and SGD take `found_inf` as GradScaler would hand it over, and where it is
        # 1 leave weights, moments and step count as they were, on the device.
        run.torch_optimizer.found_inf = (~finite).float()
        run.optimizer.step()
        applied, bad = finite, ~finite
    else:
        # fp16: GradScaler (inside Accelerate) reads its overflow flag on the host, a sync
        # every step, and skips overflowing steps itself; only a non-finite loss is bad.
        run.optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped
        stats.fp16_skipped += skipped
        applied, bad = torch.full_like(finite, not skipped), ~torch.isfinite(step_loss)
    # Every step advances the schedule, skipped or not: a step's learning rate depends on its
    # number only (a resumed run recomputes the same), and the host needs nothing from the
    # device to know it.
    run.scheduler.step()
    stats.add_step(step, step_loss, grad_norm.detach(), applied, bad)
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None and step % run.config.ema.every_steps == 0:
        sync_buffers(accelerator, model)  # every rank averages rank 0's buffers: equal EMAs
        update_ema(run.ema, accelerator.unwrap_model(model, keep_torch_compile=False), step,
                   run.config.ema)
    timer.steps += 1


def read_stats(run: Run, stats: StepStats) -> dict:
    """The step statistics so far (the host waits for the device); Diverged if too many steps
    in a row were not finite."""
    seen = stats.read(run.accelerator)
    run.state["nonfinite_steps"] = seen["bad"]
    if seen["worst_run"] >= run.config.max_nonfinite_steps:
        end, good = seen["worst_run_end"], checkpoint.latest_checkpoint(run.run_dir)
        raise Diverged(f"loss or gradient norm not finite for {seen['worst_run']} steps in a row "
                       f"(steps {end - seen['worst_run'] + 1} to {end}); "
                       + (f"the last good checkpoint is {good}" if good else
                          "no checkpoint was saved")
                       + ". Lower optim.lr, set optim.grad_clip, or check the data")
    return seen


def evaluate_and_log(run: Run, step: int) -> dict[str, float]:
    """Evaluate on every rank, log the results and (main process) the task's extras."""
    accelerator = run.accelerator
    sync_buffers(accelerator, run.model)
    model = accelerator.unwrap_model(run.model)
    cap = run.config.eval_max_batches
    if cap == "auto":  # a bounded cost during training, the whole set at the end
        cap = None if step == run.config.max_steps else AUTO_EVAL_BATCHES
    results = evaluate(accelerator, run.task, model, run.val_dl, cap)
    if run.ema is not None:  # the same evaluation of the averaged weights, as val_ema/*
        averaged = evaluate(accelerator, run.task, run.ema.module, run.val_dl, cap)
        results.update({k.replace("val/", "val_ema/", 1): v for k, v in averaged.items()})
    extras = run.task.eval_extras(model, step) if accelerator.is_main_process else {}
    run.model.train()
    run.metrics.log(step, results, extras)
    return results


def evaluate(accelerator, task, model, loader, max_batches: int | None) -> dict[str, float]:
    """The task's metrics, exact over the whole validation set (or max_batches per rank)."""
    return task.eval_metrics(evaluation_sums(accelerator, task, model, loader, max_batches))


@torch.no_grad()
def evaluation_sums(accelerator, task, model, loader, max_batches: int | None) -> dict:
    """The task's eval_sums over the loader: per-rank sums, then one sum-reduce across ranks;
    every rank gets the totals (plain numbers, or lists for vector sums)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            batch_sums = task.eval_sums(model, send_to_device(batch, accelerator.device))
        for key, value in batch_sums.items():
            sums[key] = sums.get(key, 0) + value.detach().double()
    keys = sorted(sums)  # same keys on every rank: each has at least one batch (checked in set_up)
    # One reduce for all sums; a sum may be a vector (e.g. per-class counts).
    flat = accelerator.reduce(torch.cat([sums[k].reshape(-1) for k in keys]), reduction="sum")
    totals = dict(zip(keys, flat.split([sums[k].numel() for k in keys])))
    model.train()
    return {k: totals[k].reshape(sums[k].shape).tolist() for k in keys}


def sync_buffers(accelerator, model) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm running stats). DDP copies them only at
    the start of a training forward, so after a step each rank's differ: without this, ranks
    would evaluate slightly different models, and not the one rank 0 checkpoints."""
    if accelerator.num_processes > 1:
        # One broadcast per dtype, not one per buffer (a ResNet-50 has 160): with an EMA this
        # runs at every update.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in accelerator.unwrap_model(model).buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            torch._foreach_copy_(buffers, [f.view_as(b) for f, b in
                                           zip(flat.split([b.numel() for b in buffers]), buffers)])
