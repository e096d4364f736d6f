"""Checkpoints: a kill at any moment (even mid-save) leaves a loadable checkpoint, corrupt ones
are skipped with a warning, and a changed config is refused with the differing keys named."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, read_jsonl, run_module
from train.checkpoint import LOOP_STATE, complete_checkpoints, config_differences

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
TINY = ["log_every=1", "eval_every=1000", "wandb.mode=disabled", "progress_bar=false",
        "device=cpu", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "data.block_size=32", "data.batch_size=8", "keep_checkpoints=3"]


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_module("train", LM_TINY, f"output_dir={out}", "max_steps=6", "checkpoint_every=2", *TINY)
    return out


def test_keeps_the_last_k_complete_checkpoints(finished_run):
    names = [p.name for p in complete_checkpoints(finished_run)]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((finished_run / "checkpoints").glob(".tmp-*"))


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    # A wide model makes each save take long enough to be caught half-written.
    args = ["max_steps=40", "checkpoint_every=1", *TINY, "model.d_model=256", "model.d_ff=2048",
            "model.n_heads=4"]
    proc = subprocess.Popen([sys.executable, "-m", "train", str(LM_TINY), f"output_dir={out}",
                             *args], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            root = out / "checkpoints"
            if len(complete_checkpoints(out)) >= 2 and list(root.glob(".tmp-*/*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before a save could be interrupted"
    assert list((out / "checkpoints").glob(".tmp-*")), "the kill should land mid-save"
    last_complete = complete_checkpoints(out)[-1]

    done = run_module("train", LM_TINY, f"output_dir={out}", *args)
    assert f"resumed from {last_complete}" in done.stderr
    assert _steps(out) == list(range(1, 41))  # steps after the checkpoint were redone, once


def test_a_truncated_checkpoint_is_skipped_with_a_warning(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    newest = complete_checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_module("train", out / "config.yaml", f"output_dir={out}", "max_steps=8")
    assert "skipping corrupt checkpoint" in proc.stderr and "truncated" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    assert _steps(out) == list(range(1, 9))


def test_a_changed_config_is_refused_with_the_keys_named(finished_run):
    before = (finished_run / "metrics.jsonl").read_text()
    proc = run_module("train", finished_run / "config.yaml", "optim.lr=0.5", "seed=9",
                      "max_steps=7", check=False)
    assert proc.returncode == 2
    assert "optim.lr: 0.002 -> 0.5" in proc.stderr and "seed: 1234 -> 9" in proc.stderr
    assert "allow_config_change=true" in proc.stderr
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_only_run_length_and_reporting_keys_may_change():
    saved = {"max_steps": 5, "log_every": 1, "optim": {"lr": 1.0}, "data": {"num_workers": 0}}
    now = {"max_steps": 9, "log_every": 3, "optim": {"lr": 1.0}, "data": {"num_workers": 2}}
    assert config_differences(saved, now) == []
    now["optim"]["lr"] = 2.0
    assert config_differences(saved, now) == ["optim.lr: 1.0 -> 2.0"]


def test_resume_from_an_explicit_bad_path_exits_2(tmp_path):
    proc = run_module("train", LM_TINY, f"output_dir={tmp_path}/x", f"resume={tmp_path}",
                      "max_steps=1", check=False)
    assert proc.returncode == 2 and LOOP_STATE in proc.stderr
    assert not (tmp_path / "x").exists()


def test_non_finite_steps_are_skipped_then_the_run_stops_with_exit_4(tmp_path):
    """An absurd learning rate blows the weights up: the non-finite steps are not applied (not
    to the weights, nor to the optimizer's moments and step counts), and after
    max_nonfinite_steps in a row the run stops, leaving its last good checkpoint."""
    import json

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = run_module("train", LM_TINY, f"output_dir={out}", "max_steps=50", "checkpoint_every=1",
                      "optim.lr=1e6", "optim.warmup_steps=0", "optim.grad_clip=0",
                      "max_nonfinite_steps=3", *TINY, check=False)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "not finite for 3 steps in a row (steps " in proc.stderr
    checkpoints = complete_checkpoints(out)
    last_good = checkpoints[-1]
    assert f"last good checkpoint is {last_good}" in proc.stderr.replace("\n", " ")
    assert all(torch.isfinite(t).all() for t in load_file(last_good / "model.safetensors").values())

    def saved(checkpoint):
        state = json.loads((checkpoint / LOOP_STATE).read_text())
        optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
        return state, optimizer, load_file(checkpoint / "model.safetensors")

    runs = [saved(c) for c in checkpoints]
    for state, optimizer, _ in runs:  # AdamW counted only the applied steps
        applied = state["step"] - state["nonfinite_steps"]
        assert all(param["step"] == applied for param in optimizer.values())
    compared = 0
    for (a, opt_a, weights_a), (b, opt_b, weights_b) in zip(runs, runs[1:]):
        if b["nonfinite_steps"] - a["nonfinite_steps"] == b["step"] - a["step"]:  # all skipped
            assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
            assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
            compared += 1
    assert compared, [state for state, _, _ in runs]


def test_divergence_is_noticed_at_the_next_log_step_and_not_saved(tmp_path):
    """Steps never wait to learn whether they were finite: a divergence shows when the host next
    reads the counts, here at the first log step, which then saves nothing."""
    import re

    out = tmp_path / "run"
    proc = run_module("train", LM_TINY, f"output_dir={out}", "max_steps=50", "optim.lr=1e6",
                      "optim.warmup_steps=0", "optim.grad_clip=0", "max_nonfinite_steps=3",
                      *TINY, "log_every=10", "checkpoint_every=10", check=False)
    assert proc.returncode == 4, proc.stderr[-2000:]
    found = re.search(r"not finite for (\d+) steps in a row \(steps (\d+) to (\d+)\)", proc.stderr)
    assert found, proc.stderr[-2000:]
    run, first, last = map(int, found.groups())
    assert run >= 3 and last - first + 1 == run and last <= 10
    assert "no checkpoint was saved" in proc.stderr
    assert complete_checkpoints(out) == [] and not (out / "metrics.jsonl").read_text().strip()
