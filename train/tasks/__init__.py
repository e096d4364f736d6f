"""Task families plug into the one training loop through this small interface and registry.

The loop knows nothing about text or images; a task knows nothing about devices, ranks or
precision. A task module in this package declares, in one place, its name, its config schema
(a `RunConfig` subclass) and its class:

    class MyConfig(RunConfig): ...

    @register_task("my_task", MyConfig)
    class MyTask: ...

Adding a task = adding such a module; everything else (config dispatch, `python -m train`,
`python -m train.generate` for tasks that can generate) reads the registry.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, Protocol

from train.config import RunConfig, read, validate_as
from train.errors import ConfigError


class Task(Protocol):
    collate_fn: Any  # passed to the DataLoaders; None = torch's default collate
    # (length of each training sample, window) for length-grouped batches that cut padding;
    # None = a plain shuffle. Set by datasets().
    length_grouping: tuple[list[int], int] | None
    # Optional: files the task made for the run ({name: path}, e.g. a trained tokenizer), kept
    # in the run directory and in every checkpoint.
    run_files: dict[str, Any]
    # Optional: each training sample this many times per epoch, on different ranks (repeated
    # augmentation); 1 when absent.
    sample_repeats: int

    def __init__(self, config: RunConfig) -> None: ...

    def datasets(self) -> tuple[Any, Any]:
        """(train, validation). Called on the main process first, so caches are built once."""

    def model(self): ...

    def loss(self, model, batch) -> tuple[Any, dict[str, Any]]:
        """Mean training loss of a batch, plus counters summed by the loop for throughput
        (e.g. {"tokens": ...}). Counters stay tensors: the loop reads them only when it logs."""

    def flops_per_sample(self, model) -> float | None:
        """Training FLOPs (forward + backward) of one sample, for MFU; None if unknown."""

    def eval_sums(self, model, batch) -> dict[str, Any]:
        """Per-batch sums (e.g. summed loss and counts); the loop adds them over batches and
        ranks, so the result is exact whatever the sharding."""

    def eval_metrics(self, sums: dict[str, Any]) -> dict[str, float]:
        """Turn the global sums into metrics (e.g. mean loss, bits per byte)."""

    def eval_extras(self, model, step: int) -> dict[str, Any]:
        """Things for people to look at (a text sample, an image grid), main process only."""


class Generates(Protocol):
    """What a task that `python -m train.generate` can drive adds to `Task`."""

    generate_input: str  # "prompt" (continue a text) or "source" (decode source texts)

    def generate(self, model, inputs: list[str], max_new_tokens: int | None,
                 temperature: float | None, top_k: int, generator) -> list[str]:
        """One output text per input; None arguments take the task's defaults."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type[RunConfig]
    task: type

    @property
    def generates(self) -> bool:
        return hasattr(self.task, "generate")


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, config: type[RunConfig]):
    """Class decorator: `name` in a config's `task:` key selects `config` and this class."""

    def register(cls: type) -> type:
        if name in TASKS and TASKS[name].task is not cls:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name].task} and {cls})")
        TASKS[name] = TaskSpec(name, config, cls)
        return cls

    return register


def _discover() -> None:
    """Import every task module of this package (each registers itself)."""
    for module in pkgutil.iter_modules([os.path.dirname(__file__)]):
        importlib.import_module(f"{__name__}.{module.name}")


def _import_namesake(name: str) -> None:
    """Import the task module named like the task, where there is one: a run imports only its
    own task's dependencies (torchvision alone costs seconds at every start)."""
    module = f"{__name__}.{name}"
    if str(name).isidentifier() and importlib.util.find_spec(module) is not None:
        importlib.import_module(module)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        _import_namesake(name)
    if name not in TASKS:
        _discover()
    if name not in TASKS:
        hint = difflib.get_close_matches(str(name), list(TASKS), n=1)
        raise ConfigError(f"task={name!r}: unknown task; choose one of: {', '.join(sorted(TASKS))}"
                          + (f" (did you mean {hint[0]}?)" if hint else ""))
    return TASKS[name]


def validate_config(raw: dict) -> RunConfig:
    """A raw config tree validated by its task's schema."""
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping of keys to values")
    if "task" not in raw:
        _discover()
        raise ConfigError(f"missing required key 'task' (one of: {', '.join(sorted(TASKS))})")
    return validate_as(task_spec(raw["task"]).config, raw)


def load_config(path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `dotted.key=value` overrides, validate. Raises ConfigError."""
    return validate_config(read(path, overrides))


def load_run_config(run_dir, overrides: list[str] = ()) -> RunConfig:
    """The resolved config of a training run's directory (output_dir set to where it is now,
    so that its files are read from there), with overrides; ConfigError if it is no run."""
    from pathlib import Path

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the "
                          "output_dir of a training run")
    return load_config(run_dir / "config.yaml", [f"output_dir={run_dir}", *overrides])


def build_task(config: RunConfig) -> Task:
    return task_spec(config.task).task(config)
