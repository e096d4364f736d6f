"""Shared test harness: run the real CLIs in subprocesses (single process and torchrun), a
world-size-1 gloo process group, and readers for run directories."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Token stores and trained tokenizers of this session live in a folder of its own, for
    the runs in this process and in subprocesses alike."""
    path = tmp_path_factory.mktemp("train-cache")
    previous = os.environ.get("TRAIN_CACHE")
    os.environ["TRAIN_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("TRAIN_CACHE", None)
    else:
        os.environ["TRAIN_CACHE"] = previous


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    env.pop("WANDB_API_KEY", None)  # tests never talk to a W&B server
    env.pop("WANDB_SERVICE", None)  # a command starts its own W&B service, as from a shell
    env.update(extra)
    return env


def run_module(module: str, *args: str, timeout: float = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repo root; output captured as text."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def run_torchrun(nproc: int, module: str, *args: str, timeout: float = 400, check: bool = True,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m module args...` on CPU (gloo) on a free local port."""
    return run_module("torch.distributed.run", "--nproc_per_node", str(nproc),
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                      "-m", module, *args, timeout=timeout, check=check, env=env)


def train_here(config_path, *overrides: str):
    """`python -m train CONFIG overrides...` in this process (no start-up cost): the run
    directory's metrics rows, and the TrainError it ended with (None if it finished), which
    the command would print and exit with."""
    from train.errors import TrainError
    from train.loop import train
    from train.tasks import load_config

    try:
        config = load_config(config_path, list(overrides))
    except TrainError as exc:
        return [], exc
    try:
        train(config)
        error = None
    except TrainError as exc:
        error = exc
    metrics = Path(config.output_dir) / "metrics.jsonl"
    return (read_jsonl(metrics) if metrics.exists() else []), error


def run_exported_readme(export_dir: Path, last_line: str, *args: str) -> str:
    """Run the Python of an export's README.md in a fresh interpreter, in its directory, with
    this project unimportable, its final `print(...)` line replaced by `last_line`; its stdout."""
    import re

    code = re.search(r"```python\n(.*?)```", (export_dir / "README.md").read_text(), re.S)[1]
    lines = code.rstrip().splitlines()
    assert lines[-1].startswith("print("), lines[-1]
    code = "\n".join(["import sys", "sys.modules['train'] = None", *lines[:-1], last_line])
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=export_dir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def gloo_world():
    """A world-size-1 gloo process group, as the single-process harness of distributed code."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    if dist.is_initialized():
        dist.destroy_process_group()


def single_process_metrics(run: Path, ema: bool = False) -> dict:
    """The run's latest checkpoint (its weights' moving average with `ema`) evaluated by one
    process over the whole validation set."""
    from train.checkpoint import latest_checkpoint, load_ema_weights, load_model_weights
    from train.data.loaders import eval_loader
    from train.tasks import build_task, validate_config

    config = validate_config(yaml.safe_load((run / "config.yaml").read_text()))
    task = build_task(config)
    _, val_set = task.datasets()
    model = task.model()
    checkpoint = latest_checkpoint(run)
    model.load_state_dict(load_ema_weights(checkpoint) if ema else
                          load_model_weights(checkpoint, model))
    model.eval()
    sums = {}
    with torch.no_grad():
        for batch in eval_loader(val_set, 32, 1, 0, collate_fn=task.collate_fn):
            for key, value in task.eval_sums(model, batch).items():
                sums[key] = sums.get(key, 0) + value.double()
    return task.eval_metrics({k: v.tolist() for k, v in sums.items()})


def read_wandb_run(run_dir: Path) -> dict:
    """Read back what W&B wrote offline under RUN_DIR/wandb: run ids, config and history rows.

    A `run-<id>.wandb` file is a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB blocks of
    chunks: crc32 u32, length u16, type u8) of protobuf `Record`s.
    """
    import struct

    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    # run.finish() only tells W&B's service process that a run ended; the service writes and
    # closes the run's file in its own time. Stopping the service (what a process does when
    # it exits) waits for that: runs made in this process are then complete on disk too.
    wandb.teardown()
    out = {"run_ids": [], "config": {}, "history": []}
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending, block = path.read_bytes(), 7, b"", 32768
        assert data[:4] == b":W&B", f"{path} is not a W&B run file"
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            assert pos + 7 + length <= len(data), f"{path} ends inside a record"
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind not in (1, 4):  # FIRST/MIDDLE: the record continues in the next chunk
                continue
            record = pb.Record()
            record.ParseFromString(pending)
            which = record.WhichOneof("record_type")
            if which in ("run", "config"):
                config = record.run.config if which == "run" else record.config
                out["config"].update({i.key: json.loads(i.value_json) for i in config.update})
            if which == "run":
                out["run_ids"].append(record.run.run_id)
            elif which == "history":
                out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                       for i in record.history.item})
    return out
