"""Checkpoints under RUN_DIR/checkpoints/step_NNNNNNNN/.

A checkpoint is Accelerate's `save_state` (model, optimizer, scheduler, grad scaler, every rank's
RNG states) plus `loop_state.json` (step, data position, W&B run id). It is written to a hidden
temporary directory and renamed into place only when complete, so a crash mid-save never leaves
a half-written checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LOOP_STATE = "loop_state.json"
PREFIX = "step_"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / LOOP_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run starts from, per the `resume` config key (checked before anything
    is written)."""
    from train.config import ConfigError

    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume == "never":
        if latest_checkpoint(run_dir) or (Path(run_dir) / "metrics.jsonl").exists():
            raise ConfigError(f"output_dir={str(run_dir)!r} already holds a run; pass resume=auto "
                              "to continue it, or choose another output_dir")
        return None
    path = Path(resume)
    if not (path / LOOP_STATE).is_file():
        raise ConfigError(f"resume={resume!r} is not a complete checkpoint directory (expected "
                          f"{LOOP_STATE} inside, e.g. RUN_DIR/checkpoints/step_00000100)")
    return path


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def save(accelerator, run_dir: str | os.PathLike, loop_state: dict, keep: int) -> Path:
    """Collective: every rank calls it (each saves its own RNG state)."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{loop_state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # loop_state.json is written last: its presence marks the checkpoint complete.
        (tmp / LOOP_STATE).write_text(json.dumps(loop_state, indent=1))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, checkpoint: Path) -> dict:
    """Restore everything `save` wrote into the prepared objects; return the loop state."""
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / LOOP_STATE).read_text())


def load_model_weights(checkpoint: Path) -> dict:
    """The model's state_dict from a checkpoint, on CPU, without unpickling anything."""
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"), device="cpu")
