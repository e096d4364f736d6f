"""Image classification through the shared loop: torchvision heads, frozen backbones, local and
pretrained weights, image sources, exact metrics, and the digits config end to end (single
process and two gloo ranks)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.nn import functional as F
from torchvision.models import ResNet18_Weights, get_model

from conftest import ROOT, read_jsonl, run_torchrun, single_process_metrics, train_here
from train.errors import ConfigError
from train.tasks import validate_config as validate
from train.data.images import load_image_splits
from train.models.vision import (build_classifier, drop_aux_heads, find_classifier,
                                 read_state_dict, replace_classifier)
from train.tasks.classify import ImageClassificationTask, VisionDataConfig

CONFIG = "configs/vision_tiny.yaml"
RESNET18_FILE = os.path.basename(ResNet18_Weights.DEFAULT.url)  # its name in the hub cache

# (model, input size, torchvision builder kwargs, dotted path of its head)
FAMILIES = [
    ("resnet18", 32, {}, "fc"),
    ("regnet_x_400mf", 32, {}, "fc"),
    ("shufflenet_v2_x0_5", 32, {}, "fc"),
    ("googlenet", 32, {"init_weights": True}, "fc"),
    ("inception_v3", 75, {"init_weights": True}, "fc"),
    ("alexnet", 64, {}, "classifier.6"),
    ("vgg11", 32, {}, "classifier.6"),
    ("efficientnet_b0", 32, {}, "classifier.1"),
    ("mobilenet_v2", 32, {}, "classifier.1"),
    ("mobilenet_v3_small", 32, {}, "classifier.3"),
    ("mnasnet0_5", 32, {}, "classifier.1"),
    ("squeezenet1_1", 32, {}, "classifier.1"),
    ("densenet121", 32, {}, "classifier"),
    ("vit_b_32", 32, {"image_size": 32}, "heads.head"),
    ("convnext_tiny", 32, {}, "classifier.2"),
    ("swin_t", 32, {}, "head"),
    ("maxvit_t", 224, {}, "classifier.5"),
]


def classify_config(tmp_path: Path, **overrides):
    """The digits config, validated, with `section__key=value` overrides."""
    raw = yaml.safe_load((ROOT / CONFIG).read_text())
    raw["output_dir"] = str(tmp_path / "run")
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    return validate(raw)


@pytest.mark.parametrize("name,size,kwargs,head", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_head_replacement(name, size, kwargs, head):
    torch.manual_seed(0)
    # The pretrained layout (1000 ImageNet classes), with its head swapped for 7 classes.
    model = get_model(name, **kwargs)
    drop_aux_heads(model, name)
    assert find_classifier(model, name, 1000) == head
    replace_classifier(model, head, 7)
    # Built directly with 7 classes: the same head is found.
    direct, direct_head = build_classifier(name, 7, **kwargs)
    assert direct_head == head
    x = torch.randn(2, 3, size, size)
    for m in (model, direct):
        m.train()  # aux classifiers are gone: plain logits in training mode too
        out = m(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


def test_freeze_backbone_trains_only_the_head():
    from train.config import OptimConfig
    from train.optim import optimizer_for

    torch.manual_seed(0)
    model, head = build_classifier("resnet18", 5, freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head == "fc" and trainable == {"fc.weight", "fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = optimizer_for(model, OptimConfig(lr=0.1, weight_decay=0.1))
    model.train()
    F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 5).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Norm statistics are state too: a frozen backbone keeps them.
    assert changed == {"fc.weight", "fc.bias"}


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _save_as_if_on_gpu(obj, path: Path, monkeypatch) -> None:
    """torch.save of tensors that lived on a CUDA device: the real thing when there is one,
    otherwise CPU tensors tagged as cuda:0, which is all a loader ever sees of the device."""
    if torch.cuda.is_available():
        torch.save(_to_device(obj, "cuda"), path)
        return
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # without map_location it would need the device


def test_local_weights_from_a_device_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source, _ = build_classifier("resnet18", 10)
    state = source.state_dict()

    plain = tmp_path / "plain.pt"
    _save_as_if_on_gpu(state, plain, monkeypatch)
    torch.manual_seed(2)
    same, _ = build_classifier("resnet18", 10, weights=str(plain))
    for key, value in same.state_dict().items():
        assert torch.equal(value, state[key]), key

    # DDP-style `module.` keys inside a {"state_dict": ...} wrapper, loaded for 3 classes: the
    # backbone comes from the checkpoint, the 10-class head is skipped for a fresh 3-class one.
    wrapped = tmp_path / "wrapped.pth"
    _save_as_if_on_gpu({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
                       wrapped, monkeypatch)
    assert set(read_state_dict(wrapped)) == set(state)
    fewer, head = build_classifier("resnet18", 3, weights=str(wrapped))
    assert fewer.fc.weight.shape == (3, 512)
    for key, value in fewer.state_dict().items():
        if not key.startswith(head + "."):
            assert torch.equal(value, state[key]), key

    # Another architecture's checkpoint is an error, not a half-loaded backbone.
    other = tmp_path / "other.pt"
    torch.save({"model": build_classifier("squeezenet1_1", 10)[0].state_dict()}, other)
    with pytest.raises(ConfigError, match="does not fit"):
        build_classifier("resnet18", 10, weights=str(other))


def test_pretrained_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    imagenet_layout = get_model("resnet18").state_dict()  # stands in for the downloaded file
    cached = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_layout, cached)
    model, head = build_classifier("resnet18", 10, weights="ResNet18_Weights.DEFAULT", freeze=True)
    assert head == "fc" and model.fc.out_features == 10
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, imagenet_layout[key]), key
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    # Evaluation uses the weights' own preprocessing (resize ratio 256/224, their statistics),
    # at the configured size.
    task = ImageClassificationTask(classify_config(tmp_path, model__weights="DEFAULT"))
    _, val_set = task.datasets()
    resize, crop = val_set.transform.transforms
    assert (resize.size, crop.size) == ([37], (32, 32)) and val_set[0][0].shape == (3, 32, 32)
    preset = ResNet18_Weights.DEFAULT.transforms()
    assert task.mean == tuple(preset.mean) and task.std == tuple(preset.std)


def test_eval_sums_and_metrics_are_exact():
    class FixedLogits(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, images):
            return self.logits

    config = validate({"task": "classify", "output_dir": "x", "max_steps": 1})
    task = ImageClassificationTask(config)
    # 6 classes, 3 samples: label ranks 1st, 3rd and 6th among the logits.
    logits = torch.tensor([[0.0, 5, 1, 2, 3, 4], [5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([1, 2, 0])
    sums = task.eval_sums(FixedLogits(logits), [torch.zeros(3, 3, 4, 4), labels])
    metrics = task.eval_metrics({k: v.item() for k, v in sums.items()})
    assert metrics["val/top1"] == pytest.approx(1 / 3)
    assert metrics["val/top5"] == pytest.approx(2 / 3)
    assert metrics["val/count"] == 3
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    # Fewer than 5 classes: "top-5" is top-k with k = number of classes, so always a hit.
    sums = task.eval_sums(FixedLogits(logits[:, :2]), [torch.zeros(3, 3, 4, 4), labels % 2])
    assert sums["top5"].item() == 3


def test_image_sources_and_seeded_split(tmp_path):
    digits = VisionDataConfig(source="builtin:digits", val_fraction=0.2)
    a, b, c = (load_image_splits(digits, seed) for seed in (0, 0, 1))
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == round(1797 * 0.2)
    assert a.val.indices == b.val.indices and a.val.indices != c.val.indices
    assert not set(a.train.indices) & set(a.val.indices)
    assert a.glyphs and a.classes == [str(d) for d in range(10)]

    rng = np.random.default_rng(0)
    for split, classes in (("train", ("cat", "dog", "emu")), ("val", ("cat", "emu"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    # The val folder lacks "dog": "emu" must keep label 2.
    folder = load_image_splits(VisionDataConfig(source=str(tmp_path)), 0)
    assert (len(folder.train), len(folder.val)) == (9, 6)
    assert folder.classes == ["cat", "dog", "emu"]
    assert sorted(folder.val.raw(i)[1] for i in range(6)) == [0, 0, 0, 2, 2, 2]
    single = load_image_splits(
        VisionDataConfig(source=str(tmp_path / "train"), val_fraction=0.3), 0)
    assert (len(single.train), len(single.val)) == (6, 3)
    hf = load_image_splits(VisionDataConfig(source=f"hf:{tmp_path}"), 0)
    assert (len(hf.train), len(hf.val)) == (9, 6) and hf.num_classes == 3
    image, label = hf.val.raw(0)
    assert image.mode == "RGB" and image.size == (12, 10) and label in (0, 2)
    with pytest.raises(ConfigError, match="did you mean MNIST"):
        load_image_splits(VisionDataConfig(source="torchvision:MNSIT"), 0)
    with pytest.raises(ConfigError, match="data.download=true"):
        load_image_splits(VisionDataConfig(source="torchvision:MNIST", root=str(tmp_path)), 0)


def test_digits_transforms_and_channels_last(tmp_path):
    config = classify_config(tmp_path, model__channels_last=True)
    task = ImageClassificationTask(config)
    train_set, val_set = task.datasets()
    names = [type(t).__name__ for t in train_set.transform.transforms]
    assert "RandomAffine" in names and "RandomHorizontalFlip" not in names  # digits: no mirror
    image, label = val_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    model = task.model()
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.stack([train_set[i][0] for i in range(4)])
    loss, counters = task.loss(model, [images, torch.tensor([train_set[i][1] for i in range(4)])])
    assert loss.ndim == 0 and torch.isfinite(loss) and counters["images"].item() == 4


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_prepared_once_batched_images_equal_the_whole_transform(cached, monkeypatch):
    """Prepared once (resize, crop), augmented image by image, converted batch by batch: the
    same tensors, bit for bit, as the whole v2 transform applied to each image in turn."""
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from train.data import images

    if not cached:
        monkeypatch.setattr(images, "CACHE_BYTES", 1000)  # not even one 32 px image: none kept
    splits = load_image_splits(VisionDataConfig(source="builtin:digits", image_size=32), 0)
    mean, std = images.IMAGENET_MEAN, images.IMAGENET_STD
    order = [5, 0, 17, 3, 5]
    for augment, policy in (("affine", "none"), ("crop_flip", "none"), ("none", "none"),
                            ("crop_flip", "ta_wide"), ("affine", "augmix")):
        transform = images.train_transform(32, augment, mean, std, auto_augment=policy)
        whole = v2.Compose([*transform.transforms, v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        dataset = splits.train.with_transform(transform)
        assert (dataset.prepared is not None) == cached
        # Its own generator: making the iterator must not draw from the global RNG.
        loader = DataLoader(dataset, batch_size=len(order), sampler=order,
                            generator=torch.Generator())
        torch.manual_seed(0)
        batch, labels = next(iter(loader))
        torch.manual_seed(0)
        expected = torch.stack([whole(splits.train.raw(i)[0]) for i in order])
        assert torch.equal(batch, expected), augment
        assert labels.tolist() == [splits.train.raw(i)[1] for i in order]
        torch.manual_seed(1)
        one = dataset[order[0]][0]  # a single item takes the same path
        torch.manual_seed(1)
        assert torch.equal(one, whole(splits.train.raw(order[0])[0])), augment


POLICIES = {"ra": "RandAugment", "ta_wide": "TrivialAugmentWide", "augmix": "AugMix",
            "imagenet": "AutoAugment"}


def test_recipe_sizes_policies_and_random_erasing(tmp_path):
    """torchvision's recipe keys: crop sizes and interpolation, the automatic augmentation
    policy after the crop, and random erasing of the normalised tensor."""
    from torchvision.transforms import v2

    task = ImageClassificationTask(classify_config(
        tmp_path, data__augment="crop_flip", data__train_crop_size=24, data__val_crop_size=28,
        data__val_resize_size=36, data__interpolation="bicubic", data__auto_augment="ra",
        data__ra_magnitude=12))
    train_set, val_set = task.datasets()
    policy = train_set.transform.transforms[-1]
    assert isinstance(policy, v2.RandAugment) and policy.magnitude == 12
    assert policy.interpolation == v2.InterpolationMode.BICUBIC
    assert train_set[0][0].shape == (3, 24, 24) and val_set[0][0].shape == (3, 28, 28)
    assert [t.size for t in val_set.transform.transforms] == [[36], (28, 28)]
    for name, cls in POLICIES.items():
        task = ImageClassificationTask(classify_config(tmp_path, data__auto_augment=name))
        assert type(task.datasets()[0].transform.transforms[-1]).__name__ == cls

    # Erased pixels are 0 after normalisation (the mean colour) in all three channels.
    def erased(p):
        task = ImageClassificationTask(classify_config(tmp_path, data__random_erase=p))
        items = task.datasets()[0].__getitems__(list(range(16)))
        batch = torch.stack([image for image, _ in items])
        return [bool((image == 0).all(dim=0).any()) for image in batch]

    torch.manual_seed(0)
    assert all(erased(1.0)) and not any(erased(0.0))
    with pytest.raises(ConfigError, match="val_resize_size=20 is smaller than the validation crop"):
        ImageClassificationTask(classify_config(tmp_path, data__val_resize_size=20)).datasets()


def test_repeated_augmentation_deals_copies_to_different_ranks_and_resumes_exactly():
    from train.data.loaders import RepeatedAugmentationSampler

    n, r, kw = 96, 3, dict(shuffle=True, seed=7, drop_last=True)
    data = list(range(n))
    ranks = [RepeatedAugmentationSampler(data, r, num_replicas=3, rank=k, **kw) for k in range(3)]
    per_rank = [list(s) for s in ranks]
    assert [len(x) for x in per_rank] == [n // 3] * 3  # an epoch keeps its length
    merged = [i for row in zip(*per_rank) for i in row]  # the global order
    # n / r samples, each r times in a row: one copy on each of the r ranks.
    groups = [merged[i:i + r] for i in range(0, n, r)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == n // r
    assert all(len({rank[j] for rank in per_rank}) == 1 for j in range(n // 3))
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != per_rank  # another epoch, another order
    # Resumed part-way on 2 processes: the same global order from there on.
    two = [RepeatedAugmentationSampler(data, r, num_replicas=2, rank=k, **kw) for k in range(2)]
    for s in two:
        s.set_epoch(0, skip=30)
    assert [i for row in zip(*(list(s) for s in two)) for i in row] == merged[30:]


def _mixed(task, n=10):
    """One batch of n images of distinct labels through the task's MixUp/CutMix."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    labels = torch.arange(n)
    mixed, targets = task.mixing(images, labels)
    return images, labels, mixed, targets


def test_mixup_and_cutmix_mix_images_and_targets_with_the_stated_alpha(tmp_path):
    task = ImageClassificationTask(classify_config(tmp_path, mixup_alpha=0.2))
    task.num_classes = 10
    task.mixing = task._mixing()
    torch.manual_seed(0)
    lambdas = []
    for _ in range(1000):
        images, labels, mixed, targets = _mixed(task)
        lam = targets[0, 0].item()  # image 0 mixed with image 9 (the batch rolled by one)
        assert targets.sum(dim=1).allclose(torch.ones(10)) and (targets > 0).sum() <= 20
        assert mixed[0].allclose(lam * images[0] + (1 - lam) * images[9])
        lambdas.append(lam)
    # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.179 (0.083 for alpha 1).
    lambdas = torch.tensor(lambdas)
    assert abs(lambdas.mean() - 0.5) < 0.04 and abs(lambdas.var() - 0.179) < 0.02

    task = ImageClassificationTask(classify_config(tmp_path, cutmix_alpha=1.0))
    task.num_classes = 10
    task.mixing = task._mixing()
    for _ in range(20):  # a box of image 9 pasted into image 0; the target weighs by area
        images, labels, mixed, targets = _mixed(task)
        own = (mixed[0] == 0).float().mean().item()
        assert set(mixed[0].unique().tolist()) <= {0.0, 9.0}
        assert targets[0, 0].item() == pytest.approx(own)
        assert targets[0, 9].item() == pytest.approx(1 - own)

    task = ImageClassificationTask(classify_config(tmp_path, mixup_alpha=0.2, cutmix_alpha=1.0))
    task.num_classes = 10
    kinds = [type(t).__name__ for t in task._mixing().transforms]
    assert kinds == ["MixUp", "CutMix"]  # one of the two per batch, at random


def test_unknown_model_name_is_refused_with_close_matches(tmp_path):
    _, error = train_here(CONFIG, f"output_dir={tmp_path / 'run'}", "model.name=resnet181")
    assert isinstance(error, ConfigError) and "did you mean resnet18" in str(error)
    assert not (tmp_path / "run").exists()


def test_missing_pretrained_weights_without_network_is_bad_input(tmp_path, monkeypatch):
    # An empty hub cache and a proxy that refuses connections: no weights, whatever the machine.
    refuse = "http://127.0.0.1:9"
    for name, value in dict(TORCH_HOME=str(tmp_path / "torch"), https_proxy=refuse,
                            HTTPS_PROXY=refuse, http_proxy=refuse, HTTP_PROXY=refuse).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    _, error = train_here(CONFIG, f"output_dir={tmp_path / 'run'}", "model.weights=DEFAULT")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE
    assert isinstance(error, ConfigError) and f"put it at {expected}" in str(error)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_digits_config_end_to_end_with_wandb_image_grid(tmp_path):
    run = tmp_path / "run"
    rows, _ = train_here(CONFIG, f"output_dir={run}", "max_steps=8", "log_every=4",
                         "eval_every=4", "checkpoint_every=8", "wandb.mode=offline",
                         "progress_bar=false", "example_images=8")
    evals = [r for r in rows if "val/top1" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val/count"] == 180 and 0 <= r["val/top1"] <= r["val/top5"] <= 1 for r in evals)
    assert any("images_per_s" in r for r in rows)
    grids = list(run.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert len(grids) == 2, grids
    with Image.open(grids[0]) as grid:  # 8 images of 32 px in one row, 2 px padding
        assert grid.size == (8 * 34 + 2, 36)


@pytest.mark.slow
# shufflenet has BatchNorm: after a step each rank's running statistics differ, and the loop must
# give every rank rank 0's before evaluating, or the ranks evaluate different models. The same
# holds for the weights' moving average (its buffers too): each rank evaluates its own copy.
@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5"])
def test_two_ranks_top1_is_exact_on_an_odd_validation_set(tmp_path, name):
    run = tmp_path / "run"
    run_torchrun(2, "train", CONFIG, f"output_dir={run}", f"model.name={name}", "device=cpu",
                 "max_steps=4", "log_every=2", "eval_every=4", "checkpoint_every=4",
                 "data.max_val_samples=101", "data.batch_size=16", "data.eval_batch_size=32",
                 "optim.warmup_steps=0", "wandb.mode=disabled", "progress_bar=false",
                 "ema.decay=0.5", "mixup_alpha=0.2")
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "val/top1" in r][-1]
    assert logged["val/count"] == 101  # 51 + 50 samples, none padded or counted twice

    for prefix, ema in (("val/", False), ("val_ema/", True)):
        # The same checkpoint, one process, the whole set.
        single = single_process_metrics(run, ema=ema)
        assert single["val/count"] == 101
        assert single["val/loss"] == pytest.approx(logged[prefix + "loss"], rel=1e-6)
        assert single["val/top1"] == logged[prefix + "top1"]
        assert single["val/top5"] == logged[prefix + "top5"]



def _folders_with_truncated_jpegs(root: Path) -> list[Path]:
    """train/ and val/ class folders of good JPEGs, one truncated file in each split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.jpg")
    bad = [root / "train" / "dog" / "5.jpg", root / "val" / "cat" / "1.jpg"]
    for path in bad:
        path.write_bytes(path.read_bytes()[:300])
    return bad


FOLDER_RUN = ["max_steps=3", "log_every=1", "eval_every=3", "checkpoint_every=3",
              "wandb.mode=disabled", "progress_bar=false", "device=cpu", "data.image_size=16",
              "data.batch_size=8", "data.eval_batch_size=4", "data.augment=none"]


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False], ids=["prepared-once", "read-per-batch"])
def test_unreadable_images_are_skipped_with_a_warning_naming_each(tmp_path, monkeypatch, capsys,
                                                                  cached):
    bad = _folders_with_truncated_jpegs(tmp_path / "images")
    if not cached:  # as for a dataset too big to keep in memory
        monkeypatch.setattr("train.data.images.CACHE_BYTES", 0)
    rows, error = train_here(CONFIG, f"output_dir={tmp_path / 'run'}", *FOLDER_RUN,
                             f"data.source={tmp_path / 'images'}")
    err = capsys.readouterr().err
    assert error is None, error
    assert all(f"skipping unreadable image {path}" in err for path in bad)
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["val/count"] for r in rows if "val/count" in r] == [5]  # 6 but the bad one


@pytest.mark.parametrize("cached", [True, False], ids=["prepared-once", "read-in-a-worker"])
def test_bad_images_fail_stops_naming_the_file(tmp_path, monkeypatch, cached):
    bad = _folders_with_truncated_jpegs(tmp_path / "images")
    if not cached:  # found mid-run, by a loader worker process
        monkeypatch.setattr("train.data.images.CACHE_BYTES", 0)
    _, error = train_here(CONFIG, f"output_dir={tmp_path / 'run'}", *FOLDER_RUN,
                          f"data.source={tmp_path / 'images'}", "data.bad_images=fail",
                          f"data.num_workers={0 if cached else 1}")
    assert isinstance(error, ConfigError) and error.exit_code == 2
    assert str(error).startswith("cannot read image") and "\n" not in str(error)
    assert "data.bad_images=skip" in str(error) and any(str(p) in str(error) for p in bad)
    if cached:  # found while the data is prepared: before anything is written
        assert not (tmp_path / "run").exists()
