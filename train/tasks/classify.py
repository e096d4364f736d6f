"""Image classification with any torchvision classifier."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from train.config import LoaderConfig, RunConfig, Section
from train.data.images import (AUTO_AUGMENT, IMAGENET_MEAN, IMAGENET_STD, eval_transform,
                               load_image_splits, train_transform)
from train.data.token_store import cache_root
from train.errors import ConfigError
from train.models.vision import (build_classifier, check_model_name, check_weights,
                                 pretrained_weights)
from train.tasks import register_task

DEFAULT_IMAGE_SIZE = 224
CLASSES_FILE = "classes.json"  # the class names, index by index, kept in the run directory


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
    # Sizes of torchvision's recipes, each None = from image_size: the training crop, the
    # validation crop, and the short side validation images are resized to before it (None: in
    # the pretrained weights' ratio, or the crop size itself).
    train_crop_size: int | None = Field(None, ge=8)
    val_crop_size: int | None = Field(None, ge=8)
    val_resize_size: int | None = Field(None, ge=8)
    # auto: the pretrained weights' own (bicubic for some), else bilinear.
    interpolation: Literal["auto", "bilinear", "bicubic", "nearest"] = "auto"
    # auto: `affine` for digits and letters (a flipped 2 is no 2), `crop_flip` otherwise.
    augment: Literal["auto", "crop_flip", "affine", "none"] = "auto"
    # After `augment`, an automatic policy: ra (RandAugment at ra_magnitude), ta_wide
    # (TrivialAugmentWide), augmix (at augmix_severity), or an AutoAugment policy (imagenet,
    # cifar10, svhn); then random erasing of each training image with probability random_erase.
    auto_augment: Literal[AUTO_AUGMENT] = "none"
    ra_magnitude: int = Field(9, ge=0, le=30)
    augmix_severity: int = Field(3, ge=1, le=10)
    random_erase: float = Field(0.0, ge=0, le=1)
    # Repeated augmentation (ViT-style recipes): each training sample ra_reps times per epoch,
    # on different processes, differently augmented; an epoch keeps its length.
    ra_reps: int = Field(1, ge=1)
    # An image file that cannot be read: skip it with a warning naming it, or stop (exit 2).
    bad_images: Literal["skip", "fail"] = "skip"


class VisionModelConfig(Section):
    name: str = "resnet18"  # any torchvision classification model
    num_classes: int | None = Field(None, ge=2, description="None: the classes found in the data")
    # None (random init), a torchvision weights name (DEFAULT, ResNet18_Weights.IMAGENET1K_V1)
    # or a local checkpoint file.
    weights: str | None = None
    freeze_backbone: bool = False
    channels_last: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return check_model_name(name)

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, weights: str | None, info) -> str | None:
        name = info.data.get("name")  # absent when the name itself was rejected
        return weights if name is None else check_weights(name, weights)


class ClassifyConfig(RunConfig):
    data: VisionDataConfig = VisionDataConfig()
    model: VisionModelConfig = VisionModelConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Batch mixing: MixUp and/or CutMix with these Beta(alpha, alpha) parameters (0 = off; with
    # both on, one of the two at random per batch). The loss is on the mixed targets; top-1 and
    # the validation metrics stay on the true labels.
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    example_images: int = Field(16, ge=0, description="validation images logged as a grid; 0: none")


@register_task("classify", ClassifyConfig)
class ImageClassificationTask:
    collate_fn = None  # items are (CHW float tensor, int label): the default collate stacks them
    length_grouping = None

    def __init__(self, config):
        self.config = config
        self.weights = pretrained_weights(config.model.name, config.model.weights)
        self.num_classes = config.model.num_classes
        self.classes: list[str] | None = None
        self.val_set = None
        self.mixing = None
        self.per_class = False  # train.evaluate: also sum the confusion matrix
        self.run_files: dict[str, Path] = {}  # copied into the run directory and checkpoints
        self.sample_repeats = config.data.ra_reps

    # --- data ---
    def transforms(self, glyphs: bool):
        d = self.config.data
        augment = ("affine" if glyphs else "crop_flip") if d.augment == "auto" else d.augment
        if self.weights is None:
            crop = d.image_size or DEFAULT_IMAGE_SIZE
            ratio, self.mean, self.std = 1.0, IMAGENET_MEAN, IMAGENET_STD
            interpolation = "bilinear"
        else:  # pretrained weights come with their own preprocessing: its sizes and statistics
            preset = self.weights.transforms()
            crop = d.image_size or preset.crop_size[0]
            ratio = preset.resize_size[0] / preset.crop_size[0]
            self.mean, self.std = tuple(preset.mean), tuple(preset.std)
            interpolation = preset.interpolation.value
        if d.interpolation != "auto":
            interpolation = d.interpolation
        val_crop = d.val_crop_size or crop
        val_resize = d.val_resize_size or round(val_crop * ratio)
        if val_resize < val_crop:
            raise ConfigError(f"data.val_resize_size={val_resize} is smaller than the validation "
                              f"crop ({val_crop}): the crop would be padded; set "
                              f"data.val_resize_size >= {val_crop}")
        train = train_transform(d.train_crop_size or crop, augment, self.mean, self.std,
                                d.auto_augment, interpolation, d.ra_magnitude,
                                d.augmix_severity, d.random_erase)
        return train, eval_transform(val_resize, val_crop, self.mean, self.std, interpolation)

    def datasets(self):
        splits = load_image_splits(self.config.data, self.config.seed)
        self.classes = splits.classes
        if self.num_classes is None:
            if splits.num_classes is None:
                raise ConfigError("cannot tell how many classes the data has; "
                                  "set model.num_classes")
            self.num_classes = splits.num_classes
        elif splits.num_classes is not None and splits.num_classes > self.num_classes:
            raise ConfigError(f"model.num_classes={self.num_classes} but the data has "
                              f"{splits.num_classes} classes")
        if self.num_classes < 2:  # one class: loss 0 and top-1 1.0 from the first step
            raise ConfigError(f"data.source={self.config.data.source!r} holds a single class "
                              f"({', '.join(splits.classes or ['0'])}); a classifier needs at "
                              "least 2")
        if self.classes:
            self.run_files[CLASSES_FILE] = self._classes_file()
        train_tf, eval_tf = self.transforms(splits.glyphs)
        bad = self.config.data.bad_images
        self.val_set = splits.val.with_transform(eval_tf, bad)
        return splits.train.with_transform(train_tf, bad), self.val_set

    def _classes_file(self) -> Path:
        """The class names as a JSON file in the cache (named by its content), for the loop
        to copy into the run: train.predict names its predictions with them."""
        text = json.dumps(self.classes)
        path = cache_root() / "classes" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # processes writing the same names at once: one whole file
        return path

    # --- model ---
    def model(self):
        if self.num_classes is None:
            raise RuntimeError("call datasets() first: the number of classes comes from the data")
        m = self.config.model
        model, self.head_path = build_classifier(m.name, self.num_classes, m.weights,
                                                 m.freeze_backbone, m.channels_last)
        self.mixing = self._mixing()
        return model

    def flops_per_sample(self, model) -> float:
        """Counted by torch's FLOP counter on one validation image; training = 3x forward."""
        from torch.utils.flop_counter import FlopCounterMode

        image = self.val_set.__getitems__(list(range(min(8, len(self.val_set)))))[0][0]
        was_training = model.training
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image.unsqueeze(0).to(next(model.parameters()).device))
        model.train(was_training)
        return 3.0 * counter.get_total_flops()

    def _logits(self, model, images: torch.Tensor) -> torch.Tensor:
        if self.config.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images).float()

    # --- training and evaluation ---
    def _mixing(self):
        """MixUp / CutMix over a batch (v2, as torchvision's reference recipe), or None."""
        from torchvision.transforms import v2

        c, n = self.config, self.num_classes
        mixes = ([v2.MixUp(alpha=c.mixup_alpha, num_classes=n)] if c.mixup_alpha else []) + (
            [v2.CutMix(alpha=c.cutmix_alpha, num_classes=n)] if c.cutmix_alpha else [])
        return v2.RandomChoice(mixes) if mixes else None

    def loss(self, model, batch):
        images, labels = batch
        targets = labels
        if self.mixing is not None:  # soft targets: a mix of two one-hot labels per image
            images, targets = self.mixing(images, labels)
        loss = F.cross_entropy(self._logits(model, images), targets,
                               label_smoothing=self.config.label_smoothing)
        # Made on the device: torch.tensor(n, device=...) would be a blocking host-to-device copy.
        return loss, {"images": torch.full((), len(labels), device=labels.device)}

    def eval_sums(self, model, batch):
        images, labels = batch
        logits = self._logits(model, images)
        k = min(5, logits.shape[1])  # "top-5" of fewer classes: every class counts
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        sums = {"loss": F.cross_entropy(logits, labels, reduction="sum"),
                "top1": hits[:, 0].sum(), "top5": hits.any(dim=1).sum(),
                "count": torch.tensor(len(labels), device=labels.device)}
        if self.per_class:  # rows: true class, columns: predicted class
            n = logits.shape[1]
            sums["confusion"] = torch.bincount(labels * n + logits.argmax(dim=1),
                                               minlength=n * n).view(n, n)
        return sums

    def eval_metrics(self, sums):
        count = max(sums["count"], 1)
        return {"val/loss": sums["loss"] / count, "val/top1": sums["top1"] / count,
                "val/top5": sums["top5"] / count, "val/count": int(sums["count"])}

    def eval_report(self, sums, image_path) -> dict:
        """train.evaluate's breakdown: accuracy per class (None for a class absent from the
        data) and the confusion matrix, also drawn at image_path (darker = more of the row)."""
        import numpy as np
        from PIL import Image

        matrix = np.array(sums["confusion"], dtype=np.int64)
        names = self.classes or [str(i) for i in range(len(matrix))]
        totals = matrix.sum(axis=1)
        per_class = {name: (float(matrix[i, i] / totals[i]) if totals[i] else None)
                     for i, name in enumerate(names)}
        share = matrix / np.maximum(totals, 1)[:, None]
        cell = max(1, 512 // len(matrix))
        pixels = np.kron(np.round(255 * (1 - share)).astype(np.uint8),
                         np.ones((cell, cell), dtype=np.uint8))
        Image.fromarray(pixels).save(image_path)
        return {"classes": names, "per_class_top1": per_class,
                "confusion_matrix": matrix.tolist(), "confusion_png": str(image_path)}

    @torch.no_grad()
    def eval_extras(self, model, step):
        n = min(self.config.example_images, len(self.val_set))
        if n == 0 or self.config.wandb.mode == "disabled":
            return {}
        import wandb
        from torchvision.utils import make_grid

        items = self.val_set.__getitems__(list(range(n)))  # unreadable images left out
        images = torch.stack([image for image, _ in items])
        labels = [label for _, label in items]
        device = next(model.parameters()).device
        model.eval()
        preds = self._logits(model, images.to(device)).argmax(dim=1).tolist()
        # Undo the normalisation so that people see the images the model saw.
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        grid = make_grid((images * std + mean).clamp(0, 1), nrow=8, padding=2)
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        name = (lambda c: self.classes[c]) if self.classes else str
        caption = "pred/true: " + " ".join(f"{name(p)}/{name(t)}" for p, t in zip(preds, labels))
        return {"val/examples": wandb.Image(pixels, caption=caption)}
