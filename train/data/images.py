"""Labelled image datasets for classification, from four kinds of source, as torch Datasets of
(image tensor, label) that the loop's shared loaders shard across processes.

    builtin:digits       scikit-learn's 1797 8x8 handwritten digits (shipped with it, no network)
    builtin:synthetic    2048 random images at data.image_size (throughput measurements)
    torchvision:NAME     a torchvision dataset under data.root (downloaded only if data.download)
    DIR                  an image-folder tree: DIR/train/ + DIR/val/ (or test/), or class folders
    hf:NAME | hf:DIR     a Hugging Face dataset (hub name, or a local imagefolder directory);
                         a name that is not a local path is also taken as a hub dataset

Sources without their own validation split are split by a seeded permutation, so every process
and every run with the same seed sees the same split.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from train.errors import ConfigError
from train.data import BUILTIN_PREFIX, load_hub_dataset
from train.data.loaders import seeded_split

TORCHVISION_PREFIX = "torchvision:"
HF_PREFIX = "hf:"
VAL_DIR_NAMES = ("val", "validation", "valid", "test")
# Glyph datasets: a mirrored glyph is another (or no) glyph, so they get no horizontal flips.
GLYPH_SOURCES = {"builtin:digits", "torchvision:mnist", "torchvision:emnist", "torchvision:kmnist",
                 "torchvision:qmnist", "torchvision:usps", "torchvision:svhn",
                 "torchvision:semeion"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A split's prepared images (decoded, RGB, resized, cropped) are kept in memory when they fit in
# this many bytes (per split and process): then each is prepared once, not once per epoch.
CACHE_BYTES = 1 << 30


class DigitsImages(Dataset):
    """scikit-learn's digits as 8x8 grayscale PIL images (pixel values 0..16 scaled to 0..255)."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
        self.labels = digits.target.astype(np.int64)
        self.classes = [str(c) for c in digits.target_names]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.pixels[i]), int(self.labels[i])  # 2-D uint8: grayscale


class HFImages(Dataset):
    """(image, label) items of a Hugging Face dataset."""

    def __init__(self, dataset, image_column: str, label_column: str):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        row = self.dataset[int(i)]
        return row[self.image_column], int(row[self.label_column])


class FixedClassesFolder(ImageFolder):
    """An ImageFolder that takes its class indices from the training folder, so that a
    validation folder missing a class neither fails nor shifts the labels of the others."""

    def __init__(self, root: str, class_to_idx: dict[str, int]):
        self.fixed_class_to_idx = class_to_idx
        super().__init__(root, allow_empty=True)

    def find_classes(self, directory):
        fixed = self.fixed_class_to_idx
        return sorted(fixed, key=fixed.get), fixed


def as_rgb(image) -> Image.Image:
    """Every model takes 3 channels: grayscale, palette and RGBA images are converted."""
    if isinstance(image, dict) and image.get("bytes") is not None:  # undecoded HF image
        import io

        image = Image.open(io.BytesIO(image["bytes"]))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif isinstance(image, torch.Tensor):
        image = v2.functional.to_pil_image(image)
    return image if image.mode == "RGB" else image.convert("RGB")


class StagedTransform:
    """An image transform in stages, so that the deterministic one can run once per image and
    the last one once per batch:

        prepare (deterministic: resize, crop) -> augment (random, per image) -> to_tensor (batch)

    Of an RGB PIL image it computes exactly v2.Compose([*prepare, *augment, v2.ToImage(),
    v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]) (+ v2.RandomErasing(erase)),
    drawing the same random numbers (erasing draws after the whole batch's augmentation). Every
    image leaves `augment` at the same size.
    """

    def __init__(self, prepare: list, augment: list, mean, std, erase: float = 0.0):
        self.prepare_steps, self.augment_steps = list(prepare), list(augment)
        self.transforms = [*prepare, *augment]  # what it does, for people and tests
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # Random erasing works on the normalised tensor (erased pixels = the mean colour).
        self.eraser = v2.RandomErasing(erase) if erase > 0 else None

    def prepare(self, image: Image.Image) -> Image.Image:
        for step in self.prepare_steps:
            image = step(image)
        return image

    def augment(self, image: Image.Image) -> Image.Image:
        for step in self.augment_steps:  # not a v2.Compose: its overhead shows at 32 px
            image = step(image)
        return image

    def to_tensor(self, images: list[Image.Image]) -> torch.Tensor:
        """Augmented images -> one (N, C, H, W) float tensor: the arithmetic of ToImage, ToDtype
        and Normalize, done once for the batch (image by image it costs more than augmenting)."""
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
        batch = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        batch.mul_(1 / 255).sub_(self.mean).div_(self.std)
        if self.eraser is not None:  # image by image: each draws its own box
            for i in range(len(batch)):
                batch[i] = self.eraser(batch[i])
        return batch

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor([self.augment(self.prepare(image))])[0]


# What PIL raises for a file that is not a readable image (truncated, corrupt, not an image).
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageSubset(Dataset):
    """Items `indices` of a base dataset of (image, label), as (transformed tensor, label).

    With a StagedTransform, each image's deterministic stage runs once, in `with_transform`, when
    the split's prepared images fit in CACHE_BYTES; an item then costs only its augmentation.
    The DataLoader fetches a batch's items together (`__getitems__`).

    An image that cannot be read is skipped with a warning naming it (`bad_images="skip"`: its
    batch is one item shorter; a cached split drops it up front), or stops the run with
    ConfigError naming it (`"fail"`)."""

    def __init__(self, base: Dataset, indices, transform=None, bad_images: str = "skip"):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.bad_images = bad_images
        self.skipped = 0  # unreadable images met by this process (or loader worker)
        self.prepared: list | None = None  # (prepared image, label) per item, when cached

    def with_transform(self, transform, bad_images: str = "skip") -> "ImageSubset":
        subset = ImageSubset(self.base, self.indices, transform, bad_images)
        if isinstance(transform, StagedTransform):
            subset._prepare_all()
        return subset

    def _prepare(self, i: int):
        item = self.read(i)
        return item and (self.transform.prepare(item[0]), item[1])

    def _prepare_all(self) -> None:
        """Prepare every image into `prepared` if they fit in CACHE_BYTES, dropping unreadable
        ones from `indices` (the same on every rank: they read the same files)."""
        prepared, kept, nbytes = [], [], 0
        for i in range(len(self)):
            item = self._prepare(i)
            if item is None:
                continue
            image, label = item
            image.load()  # pixels in memory, not a lazily read file
            nbytes += len(image.getbands()) * image.width * image.height
            # Judged from the first image (a large dataset is not read in vain), then the total.
            if nbytes * (len(self) if not prepared else 1) > CACHE_BYTES:
                return
            prepared.append((image, label))
            kept.append(self.indices[i])
        self.prepared, self.indices = prepared, kept

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int):
        image, label = self.base[self.indices[i]]
        return as_rgb(image), int(label)

    def describe(self, i: int) -> str:
        """Where item i comes from, for messages: a file path where the source has files."""
        j = self.indices[i]
        samples = getattr(self.base, "samples", None)  # ImageFolder: (path, label) per item
        return str(samples[j][0]) if samples is not None else f"item {j} of the dataset"

    def read(self, i: int):
        """raw(i), or None for an unreadable image under bad_images="skip"."""
        try:
            image, label = self.raw(i)
            image.load()  # decoding errors show here, not later in a transform
            return image, label
        except UNREADABLE_IMAGE as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self.bad_images == "fail":
                raise ConfigError(f"cannot read image {self.describe(i)} ({reason}); remove or "
                                  "replace it, or set data.bad_images=skip") from None
            self.skipped += 1
            print(f"warning: skipping unreadable image {self.describe(i)} ({reason}); "
                  f"{self.skipped} skipped so far by this process", file=sys.stderr)
            return None

    def __getitems__(self, indices: list[int]) -> list:
        """Items `indices` (unreadable ones left out), as the DataLoader fetches a batch:
        augmented one by one, then turned into tensors together."""
        staged = isinstance(self.transform, StagedTransform)
        if staged and self.prepared is not None:
            items = [self.prepared[i] for i in indices]
        else:
            items = [self._prepare(i) if staged else self.read(i) for i in indices]
            items = [item for item in items if item is not None]
            if not items:
                raise ConfigError(f"no image of a batch could be read ({self.describe(indices[0])}"
                                  " and the rest); check data.source")
        if not staged:
            return [((self.transform(image) if self.transform else image), label)
                    for image, label in items]
        images = self.transform.to_tensor([self.transform.augment(image) for image, _ in items])
        return list(zip(images.unbind(0), [label for _, label in items]))

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


@dataclass
class ImageSplits:
    train: ImageSubset
    val: ImageSubset
    classes: list[str] | None  # names, index = label; None when the source has none
    num_classes: int | None  # None when unknown without reading every label
    glyphs: bool  # digits or letters: no horizontal flips


def _limit(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """A seeded random subset (not the first `limit`: folder datasets are sorted by class)."""
    if limit is None or limit >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(indices[i] for i in pick.tolist())


def _split_one(base: Dataset, val_fraction: float, seed: int) -> tuple[ImageSubset, ImageSubset]:
    if len(base) < 2:
        raise ConfigError(f"the dataset holds {len(base)} image(s); need at least 2 to split")
    train_idx, val_idx = seeded_split(len(base), val_fraction, seed)
    return ImageSubset(base, train_idx), ImageSubset(base, val_idx)


def _classes_of(dataset) -> tuple[list[str] | None, int | None]:
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes], len(classes)
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels):
            return None, int(max(int(x) for x in labels)) + 1
    return None, None


class SyntheticImages(Dataset):
    """Random RGB images (a function of the index, nothing stored) with labels index % 10:
    for measuring throughput at any image size without a dataset on disk."""

    classes = [str(c) for c in range(10)]

    def __init__(self, count: int, size: int, seed: int):
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        pixels = np.random.default_rng(self.seed * 1_000_003 + int(i)).integers(
            0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return Image.fromarray(pixels), int(i) % len(self.classes)


SYNTHETIC_IMAGES = 2048  # builtin:synthetic: 2048 images, 10% of them for validation


def _builtin(name: str, cfg, seed: int) -> ImageSplits:
    if name == "synthetic":
        base = SyntheticImages(SYNTHETIC_IMAGES, cfg.image_size or 224, seed)
        train, val = _split_one(base, cfg.val_fraction, seed)
        return ImageSplits(train, val, base.classes, len(base.classes), glyphs=False)
    if name != "digits":
        raise ConfigError(f"data.source='builtin:{name}': unknown builtin dataset; "
                          "available: builtin:digits, builtin:synthetic")
    base = DigitsImages()
    train, val = _split_one(base, cfg.val_fraction, seed)
    return ImageSplits(train, val, base.classes, len(base.classes), glyphs=True)


def _torchvision(name: str, cfg, seed: int) -> ImageSplits:
    import torchvision.datasets

    available = [n for n in torchvision.datasets.__all__
                 if inspect.isclass(getattr(torchvision.datasets, n))]
    if name not in available:
        hint = difflib.get_close_matches(name, available, n=3)
        raise ConfigError(f"data.source='torchvision:{name}': no such torchvision dataset"
                          + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    cls = getattr(torchvision.datasets, name)
    params = inspect.signature(cls).parameters
    kwargs = {"download": cfg.download} if "download" in params else {}
    root = str(Path(cfg.root).expanduser())

    def make(**split):
        try:
            return cls(root, **split, **kwargs)
        except (RuntimeError, OSError) as exc:  # not found / corrupt / no network
            raise ConfigError(
                f"data.source='torchvision:{name}': cannot load it from data.root={cfg.root!r} "
                f"({str(exc).splitlines()[0]}); "
                + ("check the network or put the files there" if cfg.download else
                   "set data.download=true to fetch it, or data.root to where it is")) from None

    glyphs = f"torchvision:{name.lower()}" in GLYPH_SOURCES
    if "train" in params:
        train_base, val_base = make(train=True), make(train=False)
    elif "split" in params:
        train_base = make(split="train")
        val_base = None
        for split in ("val", "valid", "test"):
            try:
                val_base = make(split=split)
                break
            except ValueError:  # not one of this dataset's split names
                continue
        if val_base is None:
            raise ConfigError(f"data.source='torchvision:{name}': found no val/test split")
    else:
        train, val = _split_one(make(), cfg.val_fraction, seed)
        return ImageSplits(train, val, *_classes_of(train.base), glyphs=glyphs)
    return ImageSplits(ImageSubset(train_base, range(len(train_base))),
                       ImageSubset(val_base, range(len(val_base))),
                       *_classes_of(train_base), glyphs=glyphs)


def _image_folder(path: Path, cfg, seed: int) -> ImageSplits:
    val_dir = next((path / n for n in VAL_DIR_NAMES if (path / n).is_dir()), None)
    try:
        if (path / "train").is_dir() and val_dir is not None:
            train_base = ImageFolder(str(path / "train"))
            val_base = FixedClassesFolder(str(val_dir), train_base.class_to_idx)
            train = ImageSubset(train_base, range(len(train_base)))
            val = ImageSubset(val_base, range(len(val_base)))
        else:
            train_base = ImageFolder(str(path))
            train, val = _split_one(train_base, cfg.val_fraction, seed)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images in them
        raise ConfigError(f"data.source={str(path)!r}: not an image folder tree "
                          f"({exc}); expected DIR/CLASS/IMAGE or DIR/train/CLASS/IMAGE "
                          "with DIR/val/CLASS/IMAGE") from None
    return ImageSplits(train, val, list(train_base.classes), len(train_base.classes), glyphs=False)


def _hugging_face(name: str, cfg, seed: int) -> ImageSplits:
    import datasets

    path = Path(name).expanduser()
    if path.is_dir():
        loaded = load_hub_dataset(cfg.source, "imagefolder", data_dir=str(path))
    else:
        loaded = load_hub_dataset(cfg.source, name)
    train_ds = loaded["train"]
    for column in (cfg.image_column, cfg.label_column):
        if column not in train_ds.column_names:
            raise ConfigError(f"data.source={cfg.source!r}: no column {column!r} (columns: "
                              f"{', '.join(train_ds.column_names)}); set data.image_column / "
                              "data.label_column")
    val_name = next((n for n in VAL_DIR_NAMES if n in loaded), None)
    train_base = HFImages(train_ds, cfg.image_column, cfg.label_column)
    if val_name is None:
        train, val = _split_one(train_base, cfg.val_fraction, seed)
    else:
        val_base = HFImages(loaded[val_name], cfg.image_column, cfg.label_column)
        train = ImageSubset(train_base, range(len(train_base)))
        val = ImageSubset(val_base, range(len(val_base)))
    feature = train_ds.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        return ImageSplits(train, val, classes, len(classes), glyphs=False)
    labels = train_ds[cfg.label_column]  # one column read, no image decoding
    return ImageSplits(train, val, None, int(max(labels)) + 1, glyphs=False)


def load_image_splits(cfg, seed: int) -> ImageSplits:
    """Untransformed (RGB PIL image, label) train/val splits of `cfg.source` (a VisionDataConfig),
    cut to max_train_samples / max_val_samples."""
    source = cfg.source
    if source.startswith(BUILTIN_PREFIX):
        splits = _builtin(source[len(BUILTIN_PREFIX):], cfg, seed)
    elif source.startswith(TORCHVISION_PREFIX):
        splits = _torchvision(source[len(TORCHVISION_PREFIX):], cfg, seed)
    elif source.startswith(HF_PREFIX):
        splits = _hugging_face(source[len(HF_PREFIX):], cfg, seed)
    elif Path(source).expanduser().is_dir():
        splits = _image_folder(Path(source).expanduser(), cfg, seed)
    elif source.startswith((".", "/", "~")):
        raise ConfigError(f"data.source={source!r}: no such directory")
    else:
        splits = _hugging_face(source, cfg, seed)
    splits.train.indices = _limit(splits.train.indices, cfg.max_train_samples, seed)
    splits.val.indices = _limit(splits.val.indices, cfg.max_val_samples, seed + 1)
    if not len(splits.train) or not len(splits.val):
        raise ConfigError(f"data.source={source!r}: empty train or validation split "
                          f"({len(splits.train)} / {len(splits.val)} images)")
    return splits


# data.auto_augment: torchvision's policies, as its classification reference names them.
AUTO_AUGMENT = ("none", "ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")


def train_transform(size: int, augment: str, mean, std, auto_augment: str = "none",
                    interpolation: str = "bilinear", ra_magnitude: int = 9,
                    augmix_severity: int = 3, random_erase: float = 0.0) -> StagedTransform:
    """Random augmentation for training: `augment` (crop_flip, affine or none) makes a
    size x size image, then the `auto_augment` policy, then (on the normalised tensor) random
    erasing with probability `random_erase` - the order of torchvision's reference recipe."""
    mode = v2.InterpolationMode(interpolation)
    if augment == "crop_flip":  # natural images: scale/aspect jitter, mirror symmetry
        prepare = []  # the random crop needs the whole decoded image
        random = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=mode),
                  v2.RandomHorizontalFlip()]
    elif augment == "affine":  # glyphs: small shifts, rotations and scalings, never mirrored
        prepare = [v2.Resize(size, interpolation=mode), v2.CenterCrop(size)]
        random = [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]
    else:
        prepare, random = [v2.Resize(size, interpolation=mode), v2.CenterCrop(size)], []
    if auto_augment == "ra":
        random.append(v2.RandAugment(magnitude=ra_magnitude, interpolation=mode))
    elif auto_augment == "ta_wide":
        random.append(v2.TrivialAugmentWide(interpolation=mode))
    elif auto_augment == "augmix":
        random.append(v2.AugMix(severity=augmix_severity, interpolation=mode))
    elif auto_augment != "none":
        random.append(v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment), interpolation=mode))
    return StagedTransform(prepare, random, mean, std, random_erase)


def eval_transform(resize: int, crop: int, mean, std,
                   interpolation: str = "bilinear") -> StagedTransform:
    """Resize the short side to `resize`, then the centre crop x crop (no randomness)."""
    mode = v2.InterpolationMode(interpolation)
    return StagedTransform([v2.Resize(resize, interpolation=mode), v2.CenterCrop(crop)], [],
                           mean, std)
