"""Checkpoints under RUN_DIR/checkpoints/step_NNNNNNNN/.

A checkpoint is Accelerate's `save_state` (model and optimizer as safetensors/tensors, grad
scaler, every rank's RNG states) plus `loop_state.json`: step, data position, scheduler state,
W&B run id, the resolved config, and a manifest (size + sha256 of every file).

Saving is atomic: everything goes to a hidden temporary directory, is fsynced, then renamed into
place; `loop_state.json` is written last, so a directory without it is never a checkpoint. A kill
at any moment leaves the previous complete checkpoint loadable. On load the manifest is checked;
a truncated or corrupt checkpoint is reported and the previous one is used instead. Nothing is
unpickled with `weights_only=False`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from train import faults
from train.errors import ConfigError, EnvironmentFailure

LOOP_STATE = "loop_state.json"
STREAM_STATE = "stream_state_{rank}.pt"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Keys that may differ between a checkpoint's config and the resuming run's config: they change
# how long the run goes and how it reports, not what it computes.
CHANGEABLE_KEYS = {"output_dir", "max_steps", "log_every", "eval_every", "eval_max_batches",
                   "checkpoint_every", "keep_checkpoints", "progress_bar", "resume",
                   "allow_config_change", "device", "wandb", "data.num_workers",
                   "data.pin_memory", "data.eval_batch_size"}


class CorruptCheckpoint(Exception):
    pass


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints whose save finished, oldest first (not yet verified)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / LOOP_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict]:
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOOP_STATE}


def verify(checkpoint: Path) -> dict:
    """The checkpoint's loop state, after checking every file against its manifest."""
    try:
        state = json.loads((checkpoint / LOOP_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{checkpoint}: unreadable {LOOP_STATE} ({exc})") from None
    for name, want in state.get("manifest", {}).items():
        path = checkpoint / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{checkpoint}: missing {name}")
        if path.stat().st_size != want["size"]:
            raise CorruptCheckpoint(f"{checkpoint}: {name} is {path.stat().st_size} bytes, "
                                    f"expected {want['size']} (truncated?)")
        if _sha256(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{checkpoint}: {name} does not match its checksum")
    return state


def _fsync_tree(path: Path) -> None:
    for item in [*path.rglob("*"), path]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(accelerator, run_dir: str | os.PathLike, loop_state: dict, keep: int,
         files: dict[str, Path] | None = None, stream_state: dict | None = None) -> Path:
    """Collective: every rank calls it (each saves its own RNG state, and with a stream where
    its part of the stream stands). `files` are copied in too (name -> path), e.g. the run's
    tokenizer."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{loop_state['step']:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    with _environment_failures(run_dir, tmp, final):
        if accelerator.is_main_process:
            for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if stream_state is not None:
            torch.save(stream_state, tmp / STREAM_STATE.format(rank=accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, path in (files or {}).items():
                shutil.copyfile(path, tmp / name)
            faults.during_save(loop_state["step"])
            _complete(tmp, final, root, loop_state, run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _complete(tmp: Path, final: Path, root: Path, loop_state: dict, run_dir, keep: int) -> None:
    """Main process: the manifest last, then the rename that makes the checkpoint exist."""
    state = {**loop_state, "manifest": _manifest(tmp)}
    (tmp / LOOP_STATE).write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# What the libraries say when a write fails for lack of space (torch's writer and safetensors
# wrap the OS error in their own exception types).
_DISK_WORDS = ("No space left", "StorageFull", "file write failed", "Disk quota", "Read-only",
               "iostream error")
FULL_DISK_BYTES = 1 << 20  # a failed save with less free space than this: the disk is full


@contextlib.contextmanager
def _environment_failures(run_dir, tmp: Path, final: Path):
    """A save that fails because of the machine (disk full, read-only, I/O error) becomes one
    EnvironmentFailure naming the last complete checkpoint; the half-written one is removed."""
    try:
        yield
    except Exception as exc:
        try:
            full = shutil.disk_usage(final.parent).free < FULL_DISK_BYTES
        except OSError:
            full = False
        if not (full or isinstance(exc, OSError) or any(w in str(exc) for w in _DISK_WORDS)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(run_dir)
        if full:
            reason = f"No space left on device ({final.parent})"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc).splitlines()[0][:200]
        raise EnvironmentFailure(
            f"saving {final.name} failed: {reason}; the last complete checkpoint is "
            + (str(last) if last else "none") + ". Free space (or fix the filesystem), then "
            "run the same command to resume") from None


def space_warning(run_dir: Path, model, keep: int) -> str | None:
    """A warning when the disk holding `run_dir` has less free space than the checkpoints the
    run will keep (`keep` plus the one being written): weights plus AdamW's two moments."""
    size = 3 * sum(p.numel() * 4 for p in model.parameters())
    needed = size * (keep + 1)
    where = next(p for p in [run_dir, *run_dir.resolve().parents] if p.exists())
    free = shutil.disk_usage(where).free
    if free >= needed:
        return None
    return (f"warning: {where} has {free / 2**20:,.1f} MiB free; {keep + 1} checkpoints of about "
            f"{size / 2**20:,.1f} MiB each need {needed / 2**20:,.1f} MiB (free space, or lower "
            "keep_checkpoints)")


def resume_point(resume: str, run_dir: str | os.PathLike) -> list[Path]:
    """Candidate checkpoints to start from, best first, per the `resume` config key. Checked
    before anything is written."""
    if resume == "auto":
        return complete_checkpoints(run_dir)[::-1]
    if resume == "never":
        if latest_checkpoint(run_dir) or (Path(run_dir) / "metrics.jsonl").exists():
            raise ConfigError(f"output_dir={str(run_dir)!r} already holds a run; pass resume=auto "
                              "to continue it, or choose another output_dir")
        return []
    path = Path(resume)
    if not (path / LOOP_STATE).is_file():
        raise ConfigError(f"resume={resume!r} is not a complete checkpoint directory (expected "
                          f"{LOOP_STATE} inside, e.g. RUN_DIR/checkpoints/step_00000100)")
    return [path]


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring CHANGEABLE_KEYS."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in CHANGEABLE_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs


class _TiedTensorNote(logging.Filter):
    """Accelerate warns at every save that it stored a tied tensor once; tied_names() makes
    that expected, so the warning would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedTensorNote())


def tied_names(model) -> dict[str, str]:
    """{name: the first name of the same tensor} for tensors the model holds under two names
    (a head tied to the embedding): safetensors stores such a tensor once, under one name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def check_fits(checkpoint: Path, model) -> None:
    """ConfigError naming the tensors if the checkpoint's weights do not fit `model` (e.g. a
    checkpoint of another vocabulary or shape), instead of a traceback from load_state."""
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():  # sharded (FSDP) checkpoints are checked by their loader
        return
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    aliases = tied_names(model)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}
    wrong = [f"{k} {saved[k]} vs {own[k]}" for k in own if k in saved and saved[k] != own[k]]
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if wrong or missing or extra:
        found = "; ".join(filter(None, [
            wrong and "tensors of another shape: " + ", ".join(wrong[:3]),
            missing and "missing: " + ", ".join(missing[:3]),
            extra and "unexpected: " + ", ".join(extra[:3])]))
        raise ConfigError(f"{checkpoint} holds weights that do not fit this model ({found}); it "
                          "was saved by another model (or an older version of this project): "
                          "choose another output_dir, or resume=never")


def load(accelerator, candidates: list[Path], config: dict, allow_config_change: bool,
         model=None, read_saved_config=lambda saved: saved) -> tuple[Path, dict] | None:
    """Restore the first candidate that loads in full on every rank into the prepared objects
    (warning about the ones skipped) and return (checkpoint, loop state); None when there is no
    candidate. Collective: the ranks agree on the checkpoint. `read_saved_config` reads a
    checkpoint's config as today's schema would (keys it predates take their defaults)."""
    problems = []
    for checkpoint in candidates:
        try:
            state = verify(checkpoint)
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
            print(f"warning: skipping corrupt checkpoint: {exc}", file=sys.stderr)
            continue
        diffs = config_differences(read_saved_config(state["config"]), config)
        if diffs and not allow_config_change:
            raise ConfigError(f"the config differs from the one {checkpoint} was trained with ("
                              + "; ".join(diffs) + "); pass allow_config_change=true to resume "
                              "anyway, or choose another output_dir")
        if model is not None:
            check_fits(checkpoint, model)
        problem = _restore(accelerator, checkpoint)
        failed = accelerator.reduce(torch.tensor(float(problem is not None),
                                                 device=accelerator.device), reduction="sum")
        if not failed.item():
            return checkpoint, state
        problem = problem or f"{checkpoint}: another process could not load its part"
        problems.append(problem)
        print(f"warning: skipping corrupt checkpoint: {problem}", file=sys.stderr)
    if problems:
        raise ConfigError("no usable checkpoint to resume from: " + "; ".join(problems))
    return None


RNG_KEYS = {"random_state", "numpy_random_seed", "torch_manual_seed"}


def _restore(accelerator, checkpoint: Path) -> str | None:
    """Load this rank's part of the checkpoint (Accelerate's load_state); what failed, or None.
    Accelerate only logs an RNG state it cannot load: that file is read here first, so that a
    resume is either exact or refused."""
    from accelerate.utils import load as load_weights_only

    rng = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    stream = checkpoint / STREAM_STATE.format(rank=accelerator.process_index)
    try:
        states = load_weights_only(rng)
        if not isinstance(states, dict) or not RNG_KEYS <= states.keys():
            return f"{checkpoint}: {rng.name} holds no random number generator states"
        if any(checkpoint.glob(STREAM_STATE.format(rank="*"))):
            torch.load(stream, map_location="cpu", weights_only=True)
        accelerator.load_state(str(checkpoint))
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, the run goes on
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return (f"{checkpoint}: cannot load {_unloadable_file(checkpoint) or 'it'} "
                f"({type(exc).__name__}: {first_line})")
    return None


def _unloadable_file(checkpoint: Path) -> str | None:
    """After a failed load, the name of the first pickled file that does not load alone (read
    only then: an optimizer's state can be large)."""
    from accelerate.utils import load as load_weights_only

    for path in sorted(checkpoint.glob("*.bin")) + sorted(checkpoint.glob("*.p[tk]*")):
        try:
            load_weights_only(path, map_location="cpu")
        except Exception:  # noqa: BLE001
            return path.name
    return None


def load_stream_state(checkpoint: Path, rank: int) -> dict:
    """Where this rank's part of the training stream stood (tensors and plain data only)."""
    path = checkpoint / STREAM_STATE.format(rank=rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{checkpoint}: cannot read {path.name} ({type(exc).__name__}); "
                          "the stream position of this process is lost") from None


def chosen_checkpoint(run_dir: Path, given: Path | None) -> Path:
    """`given` after checking it against its manifest, or the run's latest intact checkpoint;
    ConfigError if there is none."""
    if given is None:
        latest = latest_verified(run_dir)
        if latest is None:
            raise ConfigError(f"{run_dir} has no complete, intact checkpoint under checkpoints/")
        return latest
    try:
        verify(given)
    except CorruptCheckpoint as exc:
        raise ConfigError(f"{exc}; pass a complete checkpoint directory, e.g. "
                          f"{Path(run_dir) / 'checkpoints' / 'step_00000100'}") from None
    return given


def latest_verified(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that passes `verify` (warning about newer corrupt ones)."""
    for checkpoint in complete_checkpoints(run_dir)[::-1]:
        try:
            verify(checkpoint)
            return checkpoint
        except CorruptCheckpoint as exc:
            print(f"warning: skipping corrupt checkpoint: {exc}", file=sys.stderr)
    return None


# Accelerate saves the objects registered for checkpointing as custom_checkpoint_<i>.pkl; the
# loop registers one, the moving average of the weights (train.optim.make_ema).
EMA_STATE = "custom_checkpoint_0.pkl"


def load_ema_weights(checkpoint: Path) -> dict:
    """The moving average of the weights saved in a checkpoint (keys of the model's
    state_dict), on CPU; ConfigError if the run kept none."""
    path = checkpoint / EMA_STATE
    if not path.is_file():
        raise ConfigError(f"{checkpoint} holds no moving average of the weights ({EMA_STATE}): "
                          "its run had ema.decay=0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}


def load_model_weights(checkpoint: Path, model) -> dict:
    """`model`'s state_dict from a checkpoint, on CPU, in whichever form it was saved (model
    and FSDP full state: one file; FSDP sharded state: a torch.distributed.checkpoint folder,
    read here by one process), without unpickling anything."""
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "model.safetensors"), device="cpu")
        for alias, name in tied_names(model).items():
            if alias not in weights and name in weights:
                weights[alias] = weights[name]
        return weights
    if (checkpoint / "pytorch_model_fsdp.bin").is_file():
        return torch.load(checkpoint / "pytorch_model_fsdp.bin", map_location="cpu",
                          weights_only=True)
    sharded = checkpoint / "pytorch_model_fsdp_0"
    if sharded.is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        dcp.load(state, checkpoint_id=str(sharded))  # fills the tensors in place
        return state["model"]
    raise ConfigError(f"{checkpoint} holds no model weights (model.safetensors, "
                      "pytorch_model_fsdp.bin or pytorch_model_fsdp_0/)")
