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
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    env.pop("WANDB_API_KEY", None)  # tests never talk to a W&B server
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


def run_torchrun(nproc: int, module: str, *args: str, timeout: float = 400,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m module args...` on CPU (gloo) on a free local port."""
    return run_module("torch.distributed.run", "--nproc_per_node", str(nproc),
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                      "-m", module, *args, timeout=timeout, check=check)


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
