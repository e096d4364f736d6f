"""Checkpoints: a kill at any moment (even mid-save) leaves a loadable checkpoint, corrupt ones
are skipped with a warning, and a changed config is refused with the differing keys named."""

import hashlib
import signal
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, read_jsonl, run_module, train_here
from train.errors import ConfigError, Diverged
from train.checkpoint import LOOP_STATE, complete_checkpoints, config_differences

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
TINY = ["log_every=1", "eval_every=1000", "wandb.mode=disabled", "progress_bar=false",
        "device=cpu", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "data.tokenizer=byte", "data.block_size=32", "data.batch_size=8", "keep_checkpoints=3"]


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _, error = train_here(LM_TINY, f"output_dir={out}", "max_steps=6", "checkpoint_every=2", *TINY)
    assert error is None
    return out


def test_keeps_the_last_k_complete_checkpoints(finished_run):
    names = [p.name for p in complete_checkpoints(finished_run)]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((finished_run / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["max_steps=8", "checkpoint_every=2", *TINY]
    # The process kills itself with SIGKILL once step 4's files are written, before the
    # checkpoint is complete (train/faults.py): what a kill -9 or a node failure does.
    proc = run_module("train", LM_TINY, f"output_dir={out}", *args, check=False,
                      env=cli_env(TRAIN_FAULT_KILL_IN_SAVE="4"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000002"]
    assert list((out / "checkpoints").glob(".tmp-step_00000004/*")), "the kill lands mid-save"
    assert _steps(out) == [1, 2, 3, 4]

    done = run_module("train", LM_TINY, f"output_dir={out}", *args)
    assert "resumed from" in done.stderr and "step_00000002" in done.stderr
    assert _steps(out) == list(range(1, 9))  # steps after the checkpoint were redone, once
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_truncated_checkpoint_is_skipped_with_a_warning(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    newest = complete_checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _, error = train_here(out / "config.yaml", f"output_dir={out}", "max_steps=8")
    err = capsys.readouterr().err
    assert error is None
    assert "skipping corrupt checkpoint" in err and "truncated" in err
    assert "resumed from" in err and "step_00000004" in err
    assert _steps(out) == list(range(1, 9))


class NotAllowed:  # a pickled object of a class weights_only loading refuses
    pass


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_file_that_does_not_load_makes_the_checkpoint_corrupt_even_with_its_manifest(
        finished_run, tmp_path, capsys, name):
    """A checkpoint whose file was replaced (its manifest updated to match) either loads in full
    or is skipped: a resume without the RNG state would not be the exact continuation."""
    import json
    import pickle
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    newest = complete_checkpoints(out)[-1]
    (newest / name).write_bytes(pickle.dumps({"state": NotAllowed()}))
    state = json.loads((newest / LOOP_STATE).read_text())
    state["manifest"][name] = {"size": (newest / name).stat().st_size,
                               "sha256": hashlib.sha256((newest / name).read_bytes()).hexdigest()}
    (newest / LOOP_STATE).write_text(json.dumps(state))
    _, error = train_here(out / "config.yaml", f"output_dir={out}", "max_steps=8")
    err = capsys.readouterr().err
    assert error is None
    assert f"skipping corrupt checkpoint: {newest}: cannot load {name}" in err
    assert "resumed from" in err and "step_00000004" in err
    assert _steps(out) == list(range(1, 9))


def test_a_changed_config_is_refused_with_the_keys_named(finished_run):
    before = (finished_run / "metrics.jsonl").read_text()
    _, error = train_here(finished_run / "config.yaml", "optim.lr=0.5", "seed=9", "max_steps=7")
    assert isinstance(error, ConfigError) and error.exit_code == 2
    assert "optim.lr: 0.002 -> 0.5" in str(error) and "seed: 1234 -> 9" in str(error)
    assert "allow_config_change=true" in str(error)
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_only_run_length_and_reporting_keys_may_change():
    saved = {"max_steps": 5, "log_every": 1, "optim": {"lr": 1.0}, "data": {"num_workers": 0}}
    now = {"max_steps": 9, "log_every": 3, "optim": {"lr": 1.0}, "data": {"num_workers": 2}}
    assert config_differences(saved, now) == []
    now["optim"]["lr"] = 2.0
    assert config_differences(saved, now) == ["optim.lr: 1.0 -> 2.0"]


def test_a_run_saved_before_the_recipe_keys_existed_still_resumes():
    """Keys added to the schema since a run was saved are read as their defaults, which keep
    the old meaning (post-norm, untied head, PyTorch's initialisation, no shifts)."""
    from train.config import read_as, to_dict
    from train.tasks import load_config

    old = load_config(LM_TINY, ["model.token_shift=false",  # lm_tiny.yaml before the keys
                                "model.feed_forward_shift=false"])
    saved = to_dict(old)
    for key in ("norm", "tie_embeddings", "init", "token_shift", "feed_forward_shift"):
        del saved["model"][key]
    assert config_differences(read_as(old, saved), to_dict(old)) == []
    new = load_config(LM_TINY, ["model.norm=pre", "model.tie_embeddings=true"])
    assert config_differences(read_as(new, saved), to_dict(new)) == [
        "model.feed_forward_shift: False -> True", "model.norm: 'post' -> 'pre'",
        "model.tie_embeddings: False -> True", "model.token_shift: False -> True"]


def test_a_tied_head_is_saved_once_and_resumes_and_samples_tied(tmp_path):
    """safetensors stores a tensor shared by the embedding and the head once: resuming and
    train.generate restore it under both names, still one tensor."""
    from train.generate import load_run

    out = tmp_path / "run"
    args = [f"output_dir={out}", "model.tie_embeddings=true", "model.norm=pre",
            "checkpoint_every=2", *TINY]
    assert train_here(LM_TINY, "max_steps=2", *args)[1] is None
    assert train_here(LM_TINY, "max_steps=4", *args)[1] is None
    assert _steps(out) == [1, 2, 3, 4]
    _, model, _ = load_run(out)
    assert model.head.weight is model.embed.weight


def test_resume_from_an_explicit_bad_path_is_bad_input(tmp_path):
    _, error = train_here(LM_TINY, f"output_dir={tmp_path}/x", f"resume={tmp_path}",
                          "max_steps=1")
    assert isinstance(error, ConfigError) and LOOP_STATE in str(error)
    assert not (tmp_path / "x").exists()


def test_non_finite_steps_are_skipped_then_the_run_stops_with_exit_4(tmp_path):
    """An absurd learning rate blows the weights up: the non-finite steps are not applied (not
    to the weights, nor to the optimizer's moments and step counts), and after
    max_nonfinite_steps in a row the run stops, leaving its last good checkpoint."""
    import json

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _, error = train_here(LM_TINY, f"output_dir={out}", "max_steps=50", "checkpoint_every=1",
                          "optim.lr=1e6", "optim.warmup_steps=0", "optim.grad_clip=0",
                          "max_nonfinite_steps=3", *TINY)
    assert isinstance(error, Diverged) and error.exit_code == 4
    assert "not finite for 3 steps in a row (steps " in str(error)
    checkpoints = complete_checkpoints(out)
    last_good = checkpoints[-1]
    assert f"last good checkpoint is {last_good}" in str(error)
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
    _, error = train_here(LM_TINY, f"output_dir={out}", "max_steps=50", "optim.lr=1e6",
                          "optim.warmup_steps=0", "optim.grad_clip=0", "max_nonfinite_steps=3",
                          *TINY, "log_every=10", "checkpoint_every=10")
    assert isinstance(error, Diverged)
    found = re.search(r"not finite for (\d+) steps in a row \(steps (\d+) to (\d+)\)", str(error))
    assert found, str(error)
    run, first, last = map(int, found.groups())
    assert run >= 3 and last - first + 1 == run and last <= 10
    assert "no checkpoint was saved" in str(error)
    assert complete_checkpoints(out) == [] and not (out / "metrics.jsonl").read_text().strip()


def test_a_checkpoint_of_another_model_is_refused_naming_the_tensors(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _, error = train_here(out / "config.yaml", f"output_dir={out}", "max_steps=8",
                          "model.d_model=48", "allow_config_change=true")
    assert isinstance(error, ConfigError) and "do not fit this model" in str(error)
    assert "embed.weight (259, 32) vs (259, 48)" in str(error)


def _can_mount() -> bool:
    import os
    import shutil
    import subprocess
    import tempfile

    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = tempfile.mkdtemp()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", probe], check=True)
    os.rmdir(probe)
    return ok


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount for a tmpfs")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@needs_mount
def test_a_full_disk_during_a_save_is_an_environment_failure_and_resumes_later(small_disk,
                                                                               capsys):
    import subprocess

    from train.__main__ import main
    from train.checkpoint import verify
    from train.errors import EXIT_ENVIRONMENT

    out = small_disk / "run"
    args = [str(LM_TINY), f"output_dir={out}", *TINY, "max_steps=30", "checkpoint_every=1",
            "keep_checkpoints=30"]  # checkpoints pile up until the 2 MiB are full
    assert main(args) == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    # Foreseen before anything was written: 31 checkpoints of ~0.2 MiB do not fit in 2 MiB.
    assert f"warning: {small_disk} has " in err and "lower keep_checkpoints" in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "No space left on device" in lines[0], err[-2000:]
    assert "Traceback" not in err
    last = complete_checkpoints(out)[-1]
    assert f"the last complete checkpoint is {last}" in lines[0]
    verify(last)  # intact
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written one is gone

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(args) == 0  # space freed: the same command resumes and finishes
    assert _steps(out) == list(range(1, 31))


@needs_mount
def test_a_read_only_output_dir_is_refused_before_any_work(small_disk):
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    _, error = train_here(LM_TINY, f"output_dir={small_disk / 'run'}", "max_steps=1", *TINY)
    assert isinstance(error, ConfigError) and "is not writable" in str(error)


def test_sharded_fsdp_weights_load_in_one_process(tmp_path):
    """An FSDP SHARDED_STATE_DICT checkpoint (a torch.distributed.checkpoint folder under
    pytorch_model_fsdp_0, as Accelerate writes it) is read on CPU by one process, as
    train.generate does with a GPU run's checkpoint."""
    import torch
    import torch.distributed.checkpoint as dcp

    from train.checkpoint import load_model_weights
    from train.models.sequence import TransformerLM

    saved = TransformerLM(259, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    dcp.save({"model": saved.state_dict()}, checkpoint_id=str(tmp_path / "pytorch_model_fsdp_0"))
    fresh = TransformerLM(259, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    fresh.load_state_dict(load_model_weights(tmp_path, fresh), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(),
                                                 fresh.state_dict().values()))
