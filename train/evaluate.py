"""Evaluate a checkpoint of a run, on the run's validation data or on other data its task reads.

    python -m train.evaluate RUN_DIR [CHECKPOINT] [--ema] [--out FILE] [dotted.key=value ...]
    torchrun --nproc_per_node N -m train.evaluate RUN_DIR ...      (the same numbers, sharded)

CHECKPOINT is a checkpoint directory (default: the run's latest intact one); --ema evaluates the
moving average of the weights (runs trained with ema.decay > 0). Overrides change the run's
config for this evaluation only, e.g. data.source=/data/other data.eval_batch_size=256. The
metrics, exact whatever the number of processes, are printed as JSON and written to FILE
(default RUN_DIR/eval/CHECKPOINT[-ema].json); an image classifier adds its accuracy per class
and its confusion matrix (rows: true class, columns: predicted), also drawn as a PNG beside it.
Unless wandb.mode is disabled, the report is also logged as a W&B run of its own (job type
`evaluate`) under RUN_DIR/wandb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from train.errors import ConfigError, exit_status


def log_to_wandb(config, run_dir: Path, chosen: Path, ema: bool, report: dict) -> None:
    """The report as a W&B run of its own (job type `evaluate`, next to the training run's,
    with the run's W&B settings): the metrics, and a classifier's accuracy per class and
    confusion matrix as a table and an image."""
    from train.metrics import wandb_mode

    mode = wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    name = f"{config.wandb.name or run_dir.name}-eval-{chosen.name}{'-ema' if ema else ''}"
    run = wandb.init(dir=str(run_dir), mode=mode, project=config.wandb.project,
                     entity=config.wandb.entity, tags=config.wandb.tags, name=name,
                     job_type="evaluate", config={"checkpoint": str(chosen), "ema": ema,
                                                  "data": report["data"]})
    logged = {k: v for k, v in report.items() if isinstance(v, (int, float)) and "/" in k}
    if "confusion_matrix" in report:
        classes = report["classes"]
        logged["confusion_matrix"] = wandb.Image(report["confusion_png"])
        logged["per_class"] = wandb.Table(
            columns=["class", "top1", "count"],
            data=[[c, report["per_class_top1"][c], sum(row)]
                  for c, row in zip(classes, report["confusion_matrix"])])
    run.log(logged)
    run.finish()
    print(f"W&B {mode} run {run.id}: the evaluation", file=sys.stderr)


def evaluate_run(run_dir: Path, given: Path | None, ema: bool, overrides: list[str],
                 out: Path | None) -> dict:
    """Evaluate on every process; the main process writes the report. Bad input is found
    before anything is written."""
    from train import checkpoint
    from train.data.loaders import eval_loader
    from train.loop import end_training, evaluation_sums, main_process_first, make_accelerator
    from train.tasks import build_task, load_run_config

    config = load_run_config(run_dir, overrides)
    chosen = checkpoint.chosen_checkpoint(run_dir, given)
    out = out or run_dir / "eval" / f"{chosen.name}{'-ema' if ema else ''}.json"
    accelerator = make_accelerator(config)
    failure = None
    try:
        task = build_task(config)
        with main_process_first(accelerator):
            _, val_set = task.datasets()
        model = task.model()
        weights = (checkpoint.load_ema_weights(chosen) if ema else
                   checkpoint.load_model_weights(chosen, model))
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:  # e.g. an override that changes the model
            detail = " ".join(str(exc).split())[:300]
            raise ConfigError(f"{chosen}: its weights do not fit the model this config builds "
                              f"({detail}); evaluate with the run's own model settings") from None
        model.to(accelerator.device)
        task.per_class = True  # tasks that can break their metrics down by class do
        data, world = config.data, accelerator.num_processes
        if len(val_set) < world:
            raise ConfigError(f"the evaluation set has {len(val_set)} samples, fewer than the "
                              f"{world} processes")
        loader = eval_loader(val_set, data.eval_batch_size, world, accelerator.process_index,
                             data.num_workers, data.pin_memory, task.collate_fn)
        sums = evaluation_sums(accelerator, task, model, loader, None)
        report = {"run": str(run_dir), "checkpoint": str(chosen), "ema": ema,
                  "data": getattr(data, "source", None), "processes": world,
                  **task.eval_metrics(sums)}
        if accelerator.is_main_process:
            out.parent.mkdir(parents=True, exist_ok=True)
            if hasattr(task, "eval_report"):
                report.update(task.eval_report(sums, out.with_suffix(".confusion.png")))
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            os.replace(tmp, out)  # a report is whole or absent
            log_to_wandb(config, run_dir, chosen, ema, report)
    except BaseException as exc:
        failure = type(exc)  # the ranks leave together only after a success
        raise
    finally:
        end_training(accelerator, failure)
    return {**report, "written_to": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("args", nargs="*", metavar="[CHECKPOINT] key=value",
                        help="a checkpoint directory, then dotted config overrides")
    parser.add_argument("--ema", action="store_true",
                        help="evaluate the moving average of the weights (ema.decay > 0)")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON report goes")
    args = parser.parse_intermixed_args(argv)  # flags may come between the overrides
    given = None
    if args.args and "=" not in args.args[0]:
        given, args.args = Path(args.args[0]), args.args[1:]
    try:
        report = evaluate_run(args.run_dir, given, args.ema, args.args, args.out)
    except Exception as exc:  # noqa: BLE001 - every failure ends here, told as what it is
        return exit_status(exc)
    if report["processes"] == 1 or os.environ.get("RANK", "0") == "0":
        shown = {k: v for k, v in report.items() if k not in ("confusion_matrix",)}
        print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
