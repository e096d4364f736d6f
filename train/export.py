"""Export a trained image classifier as a self-contained inference artifact.

    python -m train.export RUN_DIR OUT_DIR [--checkpoint DIR] [--ema]

OUT_DIR (new, or empty) receives `model.safetensors` (the weights of the run's latest intact
checkpoint, or --checkpoint's; their moving average with --ema), `config.yaml` (the run's
resolved config), `classes.json` (class names, index by index) and a `README.md` holding the
Python that loads and runs the model with torchvision alone: nothing of this project is needed.
The directory appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from train.errors import ConfigError, exit_status

SNIPPET = '''import json

import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2

model = torchvision.models.get_model({name!r}, num_classes={num_classes}{builder_kwargs})
model.load_state_dict(load_file("model.safetensors"))
model.eval()
classes = json.load(open("classes.json"))
preprocess = v2.Compose([
    v2.Resize({resize}, interpolation=v2.InterpolationMode.{interpolation}),
    v2.CenterCrop({crop}),
    v2.ToImage(),
    v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(mean={mean}, std={std}),
])


def classify(path, k=5):
    """[(class name, probability), ...] for an image file, most likely first."""
    image = Image.open(path).convert("RGB")
    with torch.no_grad():
        probabilities = model(preprocess(image)[None]).softmax(dim=1)[0]
    top = probabilities.topk(min(k, len(classes)))
    return [(classes[i], p) for i, p in zip(top.indices.tolist(), top.values.tolist())]
'''

README = """# {run_name}: {name} image classifier ({num_classes} classes)

Exported from the run `{run_dir}`, checkpoint `{checkpoint}`{ema}.
Validation metrics of these weights: {metrics}.

Files: `model.safetensors` (weights), `classes.json` (class names, index by index),
`config.yaml` (how it was trained).

Load and run it with torchvision (run from this directory; needs torch, torchvision,
safetensors and Pillow):

```python
{snippet}


print(classify("some_image.jpg"))
```
"""


def export(run_dir: Path, out_dir: Path, checkpoint_dir: Path | None, ema: bool) -> Path:
    from safetensors.torch import save_file

    from train.predict import load_classifier
    from train.tasks.classify import CLASSES_FILE

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not an empty directory; choose a new OUT_DIR")
    model, transform, names, chosen = load_classifier(run_dir, checkpoint_dir, ema,
                                                      "train.export")
    config_text = (run_dir / "config.yaml").read_text()
    config = yaml.safe_load(config_text)
    name = config["model"]["name"]
    resize, crop = transform.prepare_steps
    kwargs = ", aux_logits=False, init_weights=False" if name in ("googlenet",
                                                                   "inception_v3") else ""
    snippet = SNIPPET.format(name=name, num_classes=len(names), builder_kwargs=kwargs,
                             resize=resize.size, crop=list(crop.size),
                             interpolation=resize.interpolation.name,
                             mean=[round(float(m), 6) for m in transform.mean.flatten()],
                             std=[round(float(s), 6) for s in transform.std.flatten()])
    evaluation = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()
                  if '"val/' in line]
    step = int(chosen.name.rsplit("_", 1)[-1]) if chosen.name.startswith("step_") else None
    prefix = "val_ema/" if ema else "val/"
    logged = [r for r in evaluation if r.get("step") == step and prefix + "top1" in r]
    metrics = (", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in logged[-1].items()
                         if k.startswith(prefix) and isinstance(v, float))
               if logged else "not evaluated at this step")

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        (tmp / CLASSES_FILE).write_text(json.dumps(names))
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "README.md").write_text(README.format(
            run_name=run_dir.name, name=name, num_classes=len(names), run_dir=run_dir,
            checkpoint=chosen.name, ema=" (the moving average of the weights)" if ema else "",
            metrics=metrics, snippet=snippet.rstrip()))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--ema", action="store_true",
                        help="export the moving average of the weights (ema.decay > 0)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, args.checkpoint, args.ema)
    except Exception as exc:  # noqa: BLE001 - every failure ends here, told as what it is
        return exit_status(exc)
    print(f"exported to {out} (load it as {out / 'README.md'} shows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
