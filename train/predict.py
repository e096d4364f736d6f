"""Classify images with a trained image classifier.

    python -m train.predict RUN_DIR IMAGE_OR_DIR... [--top-k 5] [--format text|csv|json]
        [--checkpoint DIR] [--ema] [--batch-size 64]

Each image is preprocessed exactly as the run's validation images were (resize, centre crop,
normalisation) and the model of the run's latest intact checkpoint (or --checkpoint, or the
moving average of the weights with --ema) predicts it in batches, on CPU. Directories are
searched recursively for image files. Output, one image at a time in the order given:
`text`: PATH<TAB>CLASS:PROBABILITY ... (most likely first); `csv`: path,rank,class,probability
rows; `json`: one list of {"path", "top": [{"class", "probability"}]}. An unreadable image is
reported on stderr and skipped; the exit status is 2 if none could be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from train.errors import ConfigError, exit_status
from train.tasks.classify import CLASSES_FILE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm"}


def image_paths(inputs: list[Path]) -> list[Path]:
    paths = []
    for given in inputs:
        if given.is_dir():
            paths += sorted(p for p in given.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif given.is_file():
            paths.append(given)  # named explicitly: tried whatever its suffix
        else:
            raise ConfigError(f"{given}: no such file or directory")
    if not paths:
        raise ConfigError(f"no image files in {', '.join(map(str, inputs))}")
    return paths


def load_classifier(run_dir: Path, checkpoint_dir: Path | None, ema: bool,
                    command: str = "train.predict"):
    """(model on CPU in eval mode, the validation transform, class names, checkpoint) of a
    classify run; `command` names the caller in the message for another kind of run."""
    from train import checkpoint
    from train.tasks import build_task, load_run_config

    config = load_run_config(run_dir, ["device=cpu"])
    if config.task != "classify":
        raise ConfigError(f"{run_dir} trained a {config.task!r} model; {command} is for "
                          "image classifiers (sample sequence models with train.generate)")
    chosen = checkpoint.chosen_checkpoint(run_dir, checkpoint_dir)
    task = build_task(config)
    names_file = run_dir / CLASSES_FILE
    if names_file.is_file():
        task.classes = json.loads(names_file.read_text())
        task.num_classes = config.model.num_classes or len(task.classes)
    else:  # a run from before classes.json: its data tell
        task.datasets()
    model = task.model()
    model.load_state_dict(checkpoint.load_ema_weights(chosen) if ema else
                          checkpoint.load_model_weights(chosen, model), strict=True)
    _, transform = task.transforms(glyphs=False)  # validation preprocessing: no augmentation
    names = task.classes or [str(i) for i in range(task.num_classes)]
    return model.eval(), transform, names, chosen


def predict(model, transform, paths: list[Path], top_k: int, batch_size: int):
    """Yield (path, [(class index, probability), ...]) for each readable image, in order."""
    import torch
    from PIL import Image

    from train.data.images import UNREADABLE_IMAGE, as_rgb

    for start in range(0, len(paths), batch_size):
        batch, kept = [], []
        for path in paths[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    image.load()
                    batch.append(transform.prepare(as_rgb(image)))
                kept.append(path)
            except UNREADABLE_IMAGE as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"warning: skipping unreadable image {path} ({reason})", file=sys.stderr)
        if not batch:
            continue
        with torch.no_grad():
            probabilities = model(transform.to_tensor(batch)).float().softmax(dim=1)
        top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        for path, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
            yield path, list(zip(indices, values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--format", choices=("text", "csv", "json"), default="text")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--ema", action="store_true",
                        help="use the moving average of the weights (ema.decay > 0)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("need --top-k >= 1 and --batch-size >= 1")
    try:
        model, transform, names, _ = load_classifier(args.run_dir, args.checkpoint, args.ema)
        paths = image_paths(args.inputs)
        results = [(path, [(names[i], p) for i, p in top])
                   for path, top in predict(model, transform, paths, args.top_k, args.batch_size)]
        if not results:
            raise ConfigError(f"none of the {len(paths)} image files could be read")
    except Exception as exc:  # noqa: BLE001 - every failure ends here, told as what it is
        return exit_status(exc)
    if args.format == "json":
        print(json.dumps([{"path": str(path), "top": [{"class": c, "probability": p}
                                                      for c, p in top]}
                          for path, top in results], indent=1))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "class", "probability"])
        for path, top in results:
            writer.writerows([path, rank, c, f"{p:.6f}"] for rank, (c, p) in enumerate(top, 1))
    else:
        for path, top in results:
            print(f"{path}\t" + " ".join(f"{c}:{p:.4f}" for c, p in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
