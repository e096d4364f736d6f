"""SIGUSR1/SIGTERM: every rank stops at the same step boundary, one checkpoint is saved, the run
exits with the documented code, and running it again finishes with no step lost or repeated —
and bit for bit as if it had never stopped (same loss at every step, same final weights)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, free_port, read_jsonl, run_module
from train.signals import EXIT_STOPPED_BY_SIGNAL

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
# Dropout and gradient accumulation on: resuming must restore RNG states and the data position.
ARGS = ["max_steps=60", "log_every=1", "eval_every=1000", "checkpoint_every=1000",
        "wandb.mode=disabled", "progress_bar=false", "device=cpu", "model.d_model=32",
        "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.dropout=0.1",
        "data.block_size=32", "data.batch_size=8", "gradient_accumulation_steps=2"]


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = out / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in read_jsonl(path)):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"run never reached step {step}")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def _assert_same_run(resumed: Path, straight: Path) -> None:
    losses = [(r["step"], r["loss"]) for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r]
    assert losses == [(r["step"], r["loss"])
                      for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    final = "checkpoints/step_00000060/model.safetensors"
    a, b = load_file(resumed / final), load_file(straight / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


VISION_TINY = ROOT / "configs" / "vision_tiny.yaml"
# Random augmentation on: resuming must restore the RNG it draws from too.
VISION_ARGS = ["max_steps=60", "log_every=1", "eval_every=1000", "checkpoint_every=1000",
               "wandb.mode=disabled", "progress_bar=false", "device=cpu", "model.name=resnet18",
               "data.image_size=16", "data.batch_size=8", "data.max_train_samples=200",
               "data.max_val_samples=20", "gradient_accumulation_steps=2"]


@pytest.mark.parametrize("config, args", [(LM_TINY, ARGS), (VISION_TINY, VISION_ARGS)],
                         ids=["lm", "vision"])
def test_sigusr1_saves_and_exits_then_resume_finishes(tmp_path, config, args):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", str(config), f"output_dir={out}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED_BY_SIGNAL, err
    stopped_at = _train_steps(out)[-1]
    assert stopped_at < 60
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{stopped_at:08d}"]

    run_module("train", config, f"output_dir={out}", *args)
    assert _train_steps(out) == list(range(1, 61))
    straight = tmp_path / "straight"
    run_module("train", config, f"output_dir={straight}", *args)
    _assert_same_run(out, straight)


def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "ddp"

    def torchrun():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "-m", "train", str(LM_TINY), f"output_dir={out}", *ARGS]

    proc = subprocess.Popen(torchrun(), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, proc, 3)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)  # rank 1 only: the all-reduce must stop rank 0 too
    _, err = proc.communicate(timeout=120)
    stops = [line for line in err.splitlines() if "a checkpoint was saved" in line]
    assert len(stops) == 2 and len(set(stops)) == 1, err  # both ranks, same step
    stopped_at = _train_steps(out)[-1]
    assert f"stopped at step {stopped_at} of 60" in stops[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{stopped_at:08d}"]

    proc = subprocess.run(torchrun(), cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _train_steps(out) == list(range(1, 61))
    resumed, out = out, tmp_path / "straight"
    subprocess.run(torchrun(), cwd=ROOT, env=cli_env(), check=True, capture_output=True,
                   timeout=300)
    _assert_same_run(resumed, out)
