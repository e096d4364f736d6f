"""torchvision image classifiers: build any of them by name, load pretrained or local weights,
and fit the classification head to the task's number of classes.

    name -> torchvision builder -> (pretrained enum weights | local checkpoint) -> head of
    `num_classes` outputs -> optional frozen backbone -> optional channels_last
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from train.errors import ConfigError

# Head modules that a search by type alone could confuse with something else, by name prefix:
# squeezenet's head is a 1x1 conv (followed by ReLU and pooling), and so are its fire modules'
# squeeze layers.
SPECIAL_HEADS = {"squeezenet": "classifier.1"}
# Auxiliary classifiers (only used for an extra training loss in the original recipes): they are
# dropped, so every model returns plain logits in training mode too.
AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception": ("AuxLogits",)}
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def known_models() -> list[str]:
    """The classification models of torchvision (not detection, segmentation, video, ...)."""
    return sorted(list_models(module=torchvision.models))


def check_model_name(name: str) -> str:
    known = known_models()
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        raise ValueError(f"unknown torchvision classification model {name!r}"
                         + (f"; did you mean {', '.join(hint)}?" if hint
                            else f"; known: {', '.join(known)}"))
    return name


def is_weights_path(value: str) -> bool:
    """A local checkpoint rather than a torchvision weights enum name."""
    return (Path(value).expanduser().exists() or "/" in value or os.sep in value
            or value.lower().endswith(WEIGHT_FILE_SUFFIXES))


def pretrained_weights(name: str, value: str | None):
    """The torchvision weights enum member that `value` names for model `name`, or None when
    `value` is None or a local path. Accepts `DEFAULT`, `IMAGENET1K_V1` or the qualified
    `ResNet18_Weights.IMAGENET1K_V1`. Raises ValueError naming the valid choices."""
    if value is None or is_weights_path(value):
        return None
    enum = get_model_weights(name)
    enum_name, _, member = value.rpartition(".")
    choices = ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
    if (enum_name and enum_name != enum.__name__) or member not in enum.__members__:
        raise ValueError(f"{value!r} is not a weights name of {name} (choose one of: DEFAULT, "
                         f"{choices}) nor an existing checkpoint file")
    return enum[member]


def check_weights(name: str, value: str | None) -> str | None:
    if value is not None and is_weights_path(value):
        if not Path(value).expanduser().is_file():
            raise ValueError(f"no such checkpoint file: {value}")
        return value
    pretrained_weights(name, value)
    return value


def hub_cache_path(weights) -> Path:
    """Where torch.hub looks for (and downloads) a pretrained weights file."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def fetch_pretrained(weights) -> Path:
    """Make sure the weights file is in the torch hub cache: download it when the network allows,
    otherwise fail with where to put it by hand."""
    path = hub_cache_path(weights)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # torchvision's file names end in the first hex digits of their sha256: check them.
        digest = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(weights.url, str(path), digest and digest.group(1),
                                       progress=False)
    except Exception as exc:  # URLError, timeouts, HTTP errors, proxies, disk: all mean "not here"
        raise ConfigError(
            f"pretrained weights {type(weights).__name__}.{weights.name} are not in the torch hub "
            f"cache and could not be downloaded ({type(exc).__name__}: {exc}); download "
            f"{weights.url} and put it at {path} (torch.hub's cache; TORCH_HOME moves it), or "
            "set model.weights to a local checkpoint file") from None
    return path


def find_classifier(model: nn.Module, name: str, num_outputs: int) -> str:
    """Dotted path of the classification head: the last Linear or 1x1 Conv2d producing
    `num_outputs` values, unless the family is in SPECIAL_HEADS."""
    for prefix, path in SPECIAL_HEADS.items():
        if name.startswith(prefix):
            return path
    found = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_outputs:
            found = path
        elif (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
              and module.out_channels == num_outputs):
            found = path
    if found is None:
        raise ValueError(f"{name}: no Linear or 1x1 Conv2d head with {num_outputs} outputs")
    return found


def head_outputs(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def replace_classifier(model: nn.Module, path: str, num_classes: int) -> nn.Module:
    """Swap the head at `path` for a freshly initialised one with `num_classes` outputs."""
    old = model.get_submodule(path)
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=bias)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=bias)
    else:
        raise TypeError(f"cannot replace a {type(old).__name__} head")
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return new


def drop_aux_heads(model: nn.Module, name: str) -> None:
    for prefix, attrs in AUX_HEADS.items():
        if name.startswith(prefix):
            for attr in attrs:
                setattr(model, attr, None)
            model.aux_logits = False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a local file, on CPU whatever device it was saved from: a raw state_dict,
    or a dict holding one under `state_dict` / `model`; safetensors files too. A `module.`
    prefix (DataParallel / DDP) is removed."""
    path = Path(path).expanduser()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.weights={str(path)!r}: cannot read a checkpoint "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights={str(path)!r}: expected a state_dict (or a dict with a "
                          "'state_dict' or 'model' entry) of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_local_weights(model: nn.Module, path: str | os.PathLike, head_path: str) -> list[str]:
    """Load a checkpoint into `model`; head tensors whose shape differs (another number of
    classes) keep their fresh initialisation. Returns the skipped keys. Anything else that does
    not fit is an error: a silently half-loaded backbone is worse than none."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = head_path + "."
    skipped = [k for k in state
               if k.startswith(head) and k in own and state[k].shape != own[k].shape]
    # Auxiliary heads were dropped from the model; their tensors have nowhere to go.
    aux = tuple(f"{attr}." for attrs in AUX_HEADS.values() for attr in attrs)
    usable = {k: v for k, v in state.items() if k not in skipped and not k.startswith(aux)}
    mismatched = [k for k in usable if k in own and usable[k].shape != own[k].shape]
    missing = [k for k in own if k not in usable and k not in skipped]
    unexpected = [k for k in usable if k not in own]
    if mismatched or missing or unexpected:
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                 for what, keys in (("tensors of another shape", mismatched),
                                    ("missing tensors", missing),
                                    ("unexpected tensors", unexpected)) if keys]
        raise ConfigError(f"model.weights={str(path)!r} does not fit this model: "
                          + "; ".join(parts))
    model.load_state_dict(usable, strict=False)
    return skipped


def _norm_stays_eval(module: nn.Module, args) -> None:
    module.train(False)


def freeze_backbone(model: nn.Module, head_path: str) -> None:
    """Train only the head. The frozen backbone is a fixed feature extractor, so its norm layers
    also keep their running statistics (they run in eval mode even while the model trains)."""
    head = model.get_submodule(head_path)
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    head_modules = {id(m) for m in head.modules()}
    for module in model.modules():
        if getattr(module, "running_mean", None) is not None and id(module) not in head_modules:
            module.register_forward_pre_hook(_norm_stays_eval)


def build_classifier(name: str, num_classes: int, weights: str | None = None,
                     freeze: bool = False, channels_last: bool = False,
                     **builder_kwargs) -> tuple[nn.Module, str]:
    """(model, dotted path of its head). `builder_kwargs` go to the torchvision builder (e.g.
    `image_size` of a ViT trained from scratch)."""
    check_model_name(name)
    enum = pretrained_weights(name, weights)
    if enum is not None:
        fetch_pretrained(enum)  # then the builder loads it from the cache, without the network
        model = get_model(name, weights=enum, **builder_kwargs)
        outputs = len(enum.meta["categories"])
    else:
        if name in ("googlenet", "inception_v3"):  # their builders warn unless this is explicit
            builder_kwargs.setdefault("init_weights", True)
        model = get_model(name, num_classes=num_classes, **builder_kwargs)
        outputs = num_classes
    drop_aux_heads(model, name)
    head_path = find_classifier(model, name, outputs)
    if weights is not None and enum is None:
        load_local_weights(model, weights, head_path)
    if head_outputs(model.get_submodule(head_path)) != num_classes:
        replace_classifier(model, head_path, num_classes)
    if freeze:
        freeze_backbone(model, head_path)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, head_path
