"""The config schema: every key, its type, its default and its allowed range, in one place.

A run is described by a YAML file plus `dotted.key=value` overrides. Both are validated once by
pydantic; any problem raises `ConfigError` with one line that names the key and the bad value.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A bad config file, key, type or value. The message is meant for the user as it is."""


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(Section):
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    warmup_steps: int = Field(50, ge=0, description="linear warm-up, in optimizer steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class WandbConfig(Section):
    # auto: online when W&B credentials are found (WANDB_API_KEY or ~/.netrc), else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = []


class LoaderConfig(Section):
    """Keys the loop's DataLoaders read; every task's `data` section has them."""

    batch_size: int = Field(32, ge=1, description="per process, per micro-step")
    eval_batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False


class TextDataConfig(LoaderConfig):
    # `builtin:pydoc_topics` (text shipped with Python), a local file or directory
    # (.txt/.json/.jsonl/.parquet/.csv), or a Hugging Face hub dataset name.
    source: str = "builtin:pydoc_topics"
    text_column: str = "text"
    block_size: int = Field(128, ge=2)
    val_fraction: float = Field(0.05, gt=0, lt=1)


def _check_registered(name: str, known: list[str], what: str) -> str:
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"unknown {what} {name!r}"
                         + (f"; did you mean {', '.join(hint)}?" if hint else f"; known: {', '.join(known)}"))
    return name


class EncoderConfig(Section):
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    d_ff: int = Field(512, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        return n_heads


class SequenceModelConfig(EncoderConfig):
    arch: Literal["transformer", "lstm"] = "transformer"
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    d_ff: int = Field(1024, ge=1)
    # Any attention registered in fast-transformers' AttentionRegistry that supports a causal mask.
    attention_type: str = "chunked-causal-linear"
    attention_chunk_size: int = Field(64, ge=1)

    @field_validator("attention_type")
    @classmethod
    def _known_attention(cls, name: str) -> str:
        from train.models.attention import registered_attention_types

        return _check_registered(name, registered_attention_types(), "attention type")


class LMTaskConfig(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    sample_prompt: str = "The "
    sample_tokens: int = Field(200, ge=0, description="tokens sampled at each eval; 0 disables")
    sample_temperature: float = Field(0.8, gt=0)
    sample_top_k: int = Field(40, ge=0)


class VisionDataConfig(LoaderConfig):
    # `builtin:digits` (scikit-learn's 8x8 handwritten digits, no network), `torchvision:NAME`
    # (e.g. torchvision:MNIST, torchvision:CIFAR10, under `root`), an image directory (`train/`
    # and `val/` class folders, or class folders split by val_fraction), or a Hugging Face image
    # dataset: `hf:NAME` / any other name (hub) or `hf:DIR` (local imagefolder).
    source: str = "builtin:digits"
    root: str = Field("data", description="where torchvision datasets live")
    download: bool = Field(False, description="let torchvision datasets download into root")
    image_column: str = "image"
    label_column: str = "label"
    val_fraction: float = Field(0.1, gt=0, lt=1, description="for sources without a val split")
    max_train_samples: int | None = Field(None, ge=1)
    max_val_samples: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=8, description="None: the pretrained crop size or 224")
    # auto: `affine` for digits and letters (a flipped 2 is no 2), `crop_flip` otherwise.
    augment: Literal["auto", "crop_flip", "affine", "none"] = "auto"


class VisionModelConfig(Section):
    name: str = "resnet18"  # any torchvision classification model
    num_classes: int | None = Field(None, ge=1, description="None: the classes found in the data")
    # None (random init), a torchvision weights name (DEFAULT, ResNet18_Weights.IMAGENET1K_V1)
    # or a local checkpoint file.
    weights: str | None = None
    freeze_backbone: bool = False
    channels_last: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from train.models.vision import check_model_name

        return check_model_name(name)

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, weights: str | None, info) -> str | None:
        from train.models.vision import check_weights

        name = info.data.get("name")  # absent when the name itself was rejected
        return weights if name is None else check_weights(name, weights)


class PaddedDataConfig(LoaderConfig):
    """Variable-length token sequences, padded per batch."""

    tokenizer: str = Field("byte", description="'byte' or the path of a Hugging Face tokenizer.json")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="for sources without a val split")
    builtin_examples: int = Field(20000, ge=10, description="examples made for a builtin: source")
    # Training samples per window sorted by length (less padding); 0 or 1: a plain shuffle.
    length_window: int = Field(1024, ge=0)


class PairDataConfig(PaddedDataConfig):
    # `builtin:sort` / `builtin:reverse` (lowercase strings) / `builtin:add` ("12+345" -> "357"),
    # made on the fly; a local .jsonl/.json/.csv/.parquet file or directory; or a hub dataset.
    source: str = "builtin:sort"
    source_column: str = "source"
    target_column: str = "target"
    max_source_length: int = Field(256, ge=1, description="tokens; longer sources are cut")
    max_target_length: int = Field(256, ge=2, description="tokens incl. EOS; also the decode cap")


class LabelledTextDataConfig(PaddedDataConfig):
    # `builtin:majority` (which of a/b/c occurs most in a string), a local file or directory,
    # or a hub dataset with a text and a label column (integer, ClassLabel or string labels).
    source: str = "builtin:majority"
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(512, ge=1, description="tokens; longer texts are cut")


class Seq2SeqModelConfig(EncoderConfig):
    n_encoder_layers: int = Field(2, ge=1)
    n_decoder_layers: int = Field(2, ge=1)
    # Source encoder: any non-causal attention in fast-transformers' AttentionRegistry.
    encoder_attention_type: str = "linear"
    # Decoder self-attention: causal, with a recurrent form for decoding.
    self_attention_type: str = "chunked-causal-linear"
    # Decoder cross attention: with a recurrent cross form (linear or full).
    cross_attention_type: str = "linear"
    attention_chunk_size: int = Field(64, ge=1)

    @field_validator("encoder_attention_type")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        from train.models.attention import registered_encoder_attention_types

        return _check_registered(name, registered_encoder_attention_types(), "attention type")

    @field_validator("self_attention_type")
    @classmethod
    def _known_self(cls, name: str) -> str:
        from train.models.attention import registered_attention_types

        return _check_registered(name, registered_attention_types(), "attention type")

    @field_validator("cross_attention_type")
    @classmethod
    def _known_cross(cls, name: str) -> str:
        from train.models.attention import registered_cross_attention_types

        return _check_registered(name, registered_cross_attention_types(), "cross attention type")


class Seq2SeqTaskConfig(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    decode_examples: int = Field(8, ge=0, description="decoded val examples logged as a table")


class TextClassifierConfig(EncoderConfig):
    n_layers: int = Field(2, ge=1)
    attention_type: str = "linear"
    num_classes: int | None = Field(None, ge=2, description="None: the classes found in the data")

    @field_validator("attention_type")
    @classmethod
    def _known_attention(cls, name: str) -> str:
        from train.models.attention import registered_encoder_attention_types

        return _check_registered(name, registered_encoder_attention_types(), "attention type")


class RunConfig(Section):
    """Keys shared by every task."""

    output_dir: str
    seed: int = 0
    max_steps: int = Field(ge=1, description="optimizer steps")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = Field(1, ge=1)
    # torch.compile the model (Accelerate's dynamo backend "inductor"). Measured on a 2-core CPU
    # it gains nothing for the demo LM (compute-bound matmuls), and costs ~10 s of compiling.
    compile: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_max_batches: int | None = Field(None, ge=1, description="cap per process; None = whole set")
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
    wandb: WandbConfig = WandbConfig()
    data: LoaderConfig = LoaderConfig()  # each task narrows this to its own data schema

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false


class LMConfig(RunConfig):
    task: Literal["lm"]
    data: TextDataConfig = TextDataConfig()
    model: SequenceModelConfig = SequenceModelConfig()
    lm: LMTaskConfig = LMTaskConfig()


class ClassifyConfig(RunConfig):
    task: Literal["classify"]
    data: VisionDataConfig = VisionDataConfig()
    model: VisionModelConfig = VisionModelConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    example_images: int = Field(16, ge=0, description="validation images logged as a grid; 0: none")


class Seq2SeqConfig(RunConfig):
    task: Literal["seq2seq"]
    data: PairDataConfig = PairDataConfig()
    model: Seq2SeqModelConfig = Seq2SeqModelConfig()
    seq2seq: Seq2SeqTaskConfig = Seq2SeqTaskConfig()


class TextClassifyConfig(RunConfig):
    task: Literal["text_classify"]
    data: LabelledTextDataConfig = LabelledTextDataConfig()
    model: TextClassifierConfig = TextClassifierConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)


# One schema per task; `task:` picks it.
CONFIG_BY_TASK: dict[str, type[RunConfig]] = {"lm": LMConfig, "classify": ClassifyConfig,
                                              "seq2seq": Seq2SeqConfig,
                                              "text_classify": TextClassifyConfig}
TASK_NAMES = tuple(CONFIG_BY_TASK)


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
    """`a.b=1 c=x` -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
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


def _describe(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        fields = _field_names(CONFIG_BY_TASK[raw["task"]], loc[:-1])
        hint = difflib.get_close_matches(loc[-1], fields, n=3)
        return f"unknown key {key!r}" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
    if err["type"] == "missing":
        return f"missing required key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}={err.get('input')!r}: {msg}"


def _field_names(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(
            field.annotation, BaseModel
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def validate(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping of keys to values")
    if "task" not in raw:
        raise ConfigError(f"missing required key 'task' (one of: {', '.join(TASK_NAMES)})")
    if raw["task"] not in TASK_NAMES:
        raise ConfigError(f"task={raw['task']!r}: unknown task; choose one of: {', '.join(TASK_NAMES)}")
    try:
        return CONFIG_BY_TASK[raw["task"]].model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e, raw) for e in exc.errors()]
        raise ConfigError("; ".join(problems)) from None


def load(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, validate. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass a YAML file, e.g. configs/lm_tiny.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return validate(_merge(raw, parse_overrides(list(overrides))))


def to_dict(config: BaseModel) -> dict:
    return config.model_dump(mode="json")


def save(config: BaseModel, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
