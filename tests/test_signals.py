"""SIGUSR1/SIGTERM: every rank stops at the same step boundary, one checkpoint is saved, the run
exits with the documented code, and running it again finishes with no step lost or repeated —
and bit for bit as if it had never stopped (same loss at every step, same final weights).

The signal is sent at an exact step by the trainer's fault injection (train/faults.py), so no
test races a timer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, free_port, read_jsonl, run_torchrun, train_here
from train.checkpoint import EMA_STATE, load_ema_weights
from train.errors import EXIT_STOPPED_BY_SIGNAL, StoppedBySignal

pytestmark = pytest.mark.slow

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
STEPS = 6
# Dropout and gradient accumulation on: resuming must restore RNG states and the data position.
ARGS = [f"max_steps={STEPS}", "log_every=1", "eval_every=1000", "checkpoint_every=1000",
        "wandb.mode=disabled", "progress_bar=false", "device=cpu", "model.d_model=32",
        "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.dropout=0.1",
        "data.tokenizer=byte", "data.block_size=32", "data.batch_size=8",
        "gradient_accumulation_steps=2"]
VISION_TINY = ROOT / "configs" / "vision_tiny.yaml"
# Random augmentation and batch mixing on, and the whole recipe of torchvision's reference
# (SGD + Nesterov, weight decay per kind, an automatic policy, random erasing, MixUp/CutMix,
# repeated augmentation, the weights' moving average): resuming must restore the RNG they draw
# from and the average.
VISION_ARGS = [f"max_steps={STEPS}", "log_every=1", "eval_every=1000", "checkpoint_every=1000",
               "wandb.mode=disabled", "progress_bar=false", "device=cpu", "model.name=resnet18",
               "data.image_size=16", "data.batch_size=8", "data.max_train_samples=200",
               "data.max_val_samples=20", "gradient_accumulation_steps=2", "optim.name=sgd",
               "optim.lr=0.05", "optim.nesterov=true", "optim.weight_decay=1e-4",
               "optim.bias_weight_decay=1e-4", "data.auto_augment=ta_wide",
               "data.random_erase=0.5", "mixup_alpha=0.2", "cutmix_alpha=1.0", "ema.decay=0.9",
               "ema.every_steps=2", "ema.warmup_steps=2", "label_smoothing=0.1",
               "data.ra_reps=2"]
FINAL = f"checkpoints/step_{STEPS:08d}/model.safetensors"


def _losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _assert_same_run(resumed: Path, straight: Path) -> None:
    assert _losses(read_jsonl(resumed / "metrics.jsonl")) == _losses(
        read_jsonl(straight / "metrics.jsonl"))
    a, b = load_file(resumed / FINAL), load_file(straight / FINAL)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if (straight / FINAL).with_name(EMA_STATE).exists():
        a, b = (load_ema_weights((run / FINAL).parent) for run in (resumed, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Both signals take the same path once caught; the vision run adds the augmentation's RNG.
@pytest.mark.parametrize("config, args, signal_name", [
    (LM_TINY, ARGS, "USR1"), (LM_TINY, ARGS, "TERM"), (VISION_TINY, VISION_ARGS, "USR1")],
    ids=["lm-USR1", "lm-TERM", "vision-USR1"])
def test_a_stop_signal_saves_and_stops_then_resume_finishes(tmp_path, monkeypatch, config, args,
                                                            signal_name):
    out = tmp_path / "run"
    monkeypatch.setenv("TRAIN_FAULT_SIGNAL", f"3:0:{signal_name}")
    rows, error = train_here(config, f"output_dir={out}", *args)
    assert isinstance(error, StoppedBySignal) and error.exit_code == EXIT_STOPPED_BY_SIGNAL
    assert f"stopped at step 3 of {STEPS}" in str(error)
    assert [step for step, _ in _losses(rows)] == [1, 2, 3]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]

    monkeypatch.delenv("TRAIN_FAULT_SIGNAL")
    rows, error = train_here(config, f"output_dir={out}", *args)
    assert error is None and [step for step, _ in _losses(rows)] == list(range(1, STEPS + 1))
    straight = tmp_path / "straight"
    train_here(config, f"output_dir={straight}", *args)
    _assert_same_run(out, straight)


def _launch(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`python -m train.launch --nproc_per_node 2 -m train ...` (torchrun's options)."""
    env = cli_env(**({"TRAIN_FAULT_SIGNAL": fault} if fault else {}))
    if fault and fault.split(":")[1] == "launcher":
        # The launcher passes the signal on in its own time: the ranks wait for it after the
        # next step, so the run cannot finish first however slow the machine.
        env["TRAIN_FAULT_STALL"] = str(int(fault.split(":")[0]) + 1)
    return subprocess.run([sys.executable, "-m", "train.launch", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)


@pytest.mark.parametrize("fault", ["3:1:USR1", "3:launcher:TERM"],
                         ids=["usr1-to-one-worker", "term-to-the-launcher"])
def test_a_stop_under_the_launcher_stops_every_rank_at_one_step_and_exits_3(tmp_path, fault):
    """A signal to one worker (the all-reduce in StopFlag stops the other at the same step), or
    SIGTERM to the launcher (torchrun passes it to every worker): one complete checkpoint, and
    the launcher itself exits 3, with no traceback; the same command then finishes exactly as
    a run that never stopped."""
    out = tmp_path / "ddp"
    stopped = _launch(str(LM_TINY), f"output_dir={out}", *ARGS, fault=fault)
    assert stopped.returncode == EXIT_STOPPED_BY_SIGNAL, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "ChildFailedError" not in stopped.stderr
    (step,) = [int(p.name.removeprefix("step_")) for p in (out / "checkpoints").iterdir()]
    assert f"stopped at step {step} of {STEPS}" in stopped.stderr
    assert [s for s, _ in _losses(read_jsonl(out / "metrics.jsonl"))] == list(range(1, step + 1))
    if fault.endswith("TERM"):
        return  # the resume does not depend on which signal stopped the run: checked once, below
    assert step == 3

    finished = _launch(str(LM_TINY), f"output_dir={out}", *ARGS)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [s for s, _ in _losses(read_jsonl(out / "metrics.jsonl"))] == list(range(1, STEPS + 1))
    straight = tmp_path / "straight"
    run_torchrun(2, "train", LM_TINY, f"output_dir={straight}", *ARGS)
    _assert_same_run(out, straight)


def test_the_launcher_passes_a_workers_failure_status_on(tmp_path):
    """The main process finds the bad input while the other waits for the data: both exit 2,
    the other quietly, with no traceback, and nothing is written."""
    proc = _launch(str(LM_TINY), f"output_dir={tmp_path / 'run'}", *ARGS,
                   f"data.source={tmp_path}/missing.txt")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("no such file or directory") == 1
    assert "Traceback" not in proc.stderr and "bug" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_launcher_reports_the_documented_status_when_several_workers_fail():
    """When a rank fails, another often fails a moment later on a broken collective (status 1),
    and which one torchrun sees first is a race: the documented status wins."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from train.launch import failing_worker

    def failure(rank, status, when):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=status, error_file="")
        f.timestamp = when
        return f

    crash_first = {1: failure(1, 1, when=10), 0: failure(0, 2, when=11)}
    assert failing_worker(ChildFailedError("train", crash_first)) == (0, 2)
    only_crashes = {1: failure(1, 1, when=11), 0: failure(0, 1, when=10)}
    assert failing_worker(ChildFailedError("train", only_crashes)) == (0, 1)
