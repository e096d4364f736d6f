"""The config schema shared by every task, and how a config is read.

A run is described by a YAML file plus `dotted.key=value` overrides, validated once by pydantic;
any problem raises `ConfigError` with one line that names the key and the bad value. This file
holds the keys every task has (`RunConfig`, `optim`, `wandb`, the loaders) and the sections
several tasks share; each task's own schema lives next to the task, in `train/tasks/NAME.py`,
and `train.tasks.load_config` picks it by the config's `task` key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from train.errors import ConfigError
from train.models.attention_types import CAUSAL, CROSS, ENCODER, check_attention

__all__ = ["ConfigError", "Section", "RunConfig", "read", "validate_as", "save", "to_dict"]


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def attention(role: str):
    """A config field holding the name of an attention type that can play `role`."""
    return Annotated[str, AfterValidator(lambda name: check_attention(name, role))]


CausalAttention, EncoderAttention, CrossAttention = (attention(r) for r in (CAUSAL, ENCODER, CROSS))


class OptimConfig(Section):
    # adamw (beta1, beta2) or sgd (momentum, nesterov): torchvision's classification recipes
    # train ResNets with SGD + Nesterov momentum.
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="on weight matrices and kernels")
    # Normalisation layers' weights and biases, and other layers' biases: no decay unless set
    # (torchvision's recipes decay BatchNorm weights by 0, ResNet biases at weight_decay).
    norm_weight_decay: float = Field(0.0, ge=0)
    bias_weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0)")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up, in optimizer steps")
    # After the warm-up, in optimizer steps: cosine or linear down to lr * min_lr_ratio at
    # max_steps, step (x step_gamma every step_every steps), or constant.
    schedule: Literal["cosine", "linear", "step", "constant"] = "cosine"
    # Where cosine/linear reach their end; None: max_steps. Longer than max_steps: the run stops
    # part-way down the schedule (and can be extended later with the same curve).
    decay_steps: int | None = Field(None, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine/linear end at lr * this")
    step_every: int = Field(1000, ge=1, description="schedule=step: steps between decays")
    step_gamma: float = Field(0.1, gt=0, le=1, description="schedule=step: factor per decay")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=true needs momentum > 0 (e.g. optim.momentum=0.9)")
        return self


class WandbConfig(Section):
    # auto: online when W&B credentials are found (WANDB_API_KEY or ~/.netrc), else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = []


class EMAConfig(Section):
    # An exponential moving average of the weights (and buffers), kept beside the model,
    # evaluated as val_ema/* and saved in checkpoints: every `every_steps` optimizer steps
    # ema = decay * ema + (1 - decay) * weights; until step warmup_steps it is a copy of them.
    # On a GPU an update waits for the device once (torch's AveragedModel copies its counter
    # there): every_steps > 1 (torchvision's recipes: 32) keeps that rare.
    decay: float = Field(0.0, ge=0, lt=1, description="0: no EMA")
    every_steps: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)


class LoaderConfig(Section):
    """Keys the loop's DataLoaders read; every task's `data` section has them."""

    batch_size: int = Field(32, ge=1, description="per process, per micro-step")
    # Not a fixed larger number: at long contexts batch_size is what fits, and evaluating in
    # batches several times larger would set the run's peak memory at its first evaluation.
    eval_batch_size: int | None = Field(None, ge=1, validate_default=True,
                                        description="per process; null: batch_size")
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False

    @field_validator("eval_batch_size")
    @classmethod
    def _eval_batch_defaults_to_batch(cls, value, info):
        return info.data.get("batch_size") if value is None else value


class EncoderConfig(Section):
    """The shape of a fast-transformers stack."""

    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    d_ff: int = Field(512, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        # Checked after every field, so a default n_heads is checked against a new d_model too.
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model} "
                             "(set both so that the head width d_model / n_heads is whole)")
        return self


class PaddedDataConfig(LoaderConfig):
    """Variable-length token sequences, padded per batch (seq2seq, text classification)."""

    tokenizer: str = Field("byte", description="'byte' or the path of a Hugging Face tokenizer.json")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="for sources without a val split")
    builtin_examples: int = Field(20000, ge=10, description="examples made for a builtin: source")
    # Training samples per window sorted by length (less padding); 0 or 1: a plain shuffle.
    length_window: int = Field(1024, ge=0)


AUTO_EVAL_BATCHES = 100


class RunConfig(Section):
    """Keys shared by every task. A task's schema subclasses it (see train/tasks/)."""

    task: str
    output_dir: str
    seed: int = 0
    max_steps: int = Field(ge=1, description="optimizer steps")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = Field(1, ge=1)
    # torch.compile the model (Accelerate's dynamo backend "inductor"). Measured on a 2-core CPU
    # it gains nothing for the demo LM (compute-bound matmuls), and costs ~10 s of compiling.
    compile: bool = False
    # torch.use_deterministic_algorithms: bitwise-repeatable runs on GPUs too, where every op
    # has a deterministic kernel (an op without one stops the run, naming it); often slower.
    deterministic: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    # Batches per process an evaluation covers: auto = at most AUTO_EVAL_BATCHES during
    # training (the same ones each time) and the whole set at the end; an integer caps every
    # evaluation; null covers the whole set every time.
    eval_max_batches: Literal["auto"] | Annotated[int, Field(ge=1)] | None = "auto"
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    progress_bar: bool = True
    # auto: continue from the latest complete checkpoint in output_dir if there is one;
    # never: always start from scratch; any other value: path of a checkpoint directory.
    resume: str = "auto"
    # Resuming with a changed config is refused (listing the keys) unless this is true. Keys that
    # only shape the run's length and reporting (max_steps, *_every, ...) may always change.
    allow_config_change: bool = False
    # A step whose loss or gradient norm is not finite is skipped; this many in a row stop the run.
    max_nonfinite_steps: int = Field(10, ge=1)
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    wandb: WandbConfig = WandbConfig()
    data: LoaderConfig = LoaderConfig()  # each task narrows this to its own data schema

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false


# --- reading a config: YAML file + dotted overrides -> a raw tree -> a validated schema ---

def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {dotted}=...: {'.'.join(keys[: i + 1])} is a value, not a section"
            )
        node = child
    node[keys[-1]] = value


# YAML 1.1 reads these as booleans; on the command line they are words (true/false stay bools).
YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 c=x` -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists.
    `--a.b=1` is the same override: the form a W&B sweep agent passes its parameters in."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override {item!r}: expected dotted.key=value, e.g. max_steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if raw.strip().lower() in YAML11_BOOL_WORDS:  # `mixed_precision=no` means "no"
            value = raw.strip()
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """The raw config tree of a YAML file with overrides applied (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass a YAML file, e.g. configs/lm_tiny.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return _merge(raw, parse_overrides(list(overrides)))


def _field_names(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(
            field.annotation, BaseModel
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(err: dict, schema: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc[-1], _field_names(schema, loc[:-1]), n=3)
        return f"unknown key {key!r}" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
    if err["type"] == "missing":
        return f"missing required key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), dict):  # a check across a section's keys
        return f"{key}: {msg}" if loc else msg
    return f"{key}={err.get('input')!r}: {msg}"


def validate_as(schema: type[RunConfig], raw: dict) -> RunConfig:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e, schema) for e in exc.errors())) from None


def read_as(config: RunConfig, saved: dict) -> dict:
    """A config saved by an earlier run, read by `config`'s schema: keys added since take
    their defaults, which keep the meaning the run had (new recipe options default to off)."""
    try:
        return to_dict(type(config).model_validate(saved))
    except ValidationError:
        return saved


def to_dict(config: BaseModel) -> dict:
    return config.model_dump(mode="json")


def save(config: BaseModel, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
