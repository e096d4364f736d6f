"""Export a trained model as a self-contained inference artifact.

    python -m train.export RUN_DIR OUT_DIR [--checkpoint DIR] [--ema]

OUT_DIR (new, or empty) receives `model.safetensors` (the weights of the run's latest intact
checkpoint, or --checkpoint's; their moving average with --ema), `config.yaml` (the run's
resolved config) and a `README.md` holding the Python that loads and runs the model without
this project:
* an image classifier: `classes.json` (class names, index by index); torchvision alone runs it;
* a language model or a seq2seq model: `model.json` (the model's class and arguments),
  `modeling/` (the model's code, built on fast-transformers) and `tokenizer.json` where the run
  used one (byte tokens need none); torch and pytorch-fast-transformers run it.
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

CLASSIFIER_SNIPPET = '''import json

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

CLASSIFIER_README = """# {run_name}: {name} image classifier ({num_classes} classes)

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


CODE_DIR = "modeling"
CODE_INIT = '''"""The exported model's code: torch and pytorch-fast-transformers only."""

from .generation import sample
from .seq2seq import Seq2SeqTransformer
from .sequence import LSTMLM, TransformerLM
'''

BYTE_TOKENIZER = '''
BASE = 256  # token ids 0..255 are bytes; BASE, BASE + 1, BASE + 2 are PAD, BOS, EOS


def encode(text):
    return list(text.encode("utf-8"))


def decode(ids):
    return bytes(i for i in ids if i < BASE).decode("utf-8", errors="replace")
'''

FILE_TOKENIZER = '''
from tokenizers import Tokenizer

_tokenizer = Tokenizer.from_file("tokenizer.json")
BASE = _tokenizer.get_vocab_size(with_added_tokens=True)  # then PAD, BOS, EOS


def encode(text):
    return _tokenizer.encode(text, add_special_tokens=False).ids


def decode(ids):
    return _tokenizer.decode([i for i in ids if i < BASE])
'''

SEQUENCE_SNIPPET = '''import json
import types

import torch
from safetensors.torch import load_model

import modeling

spec = json.load(open("model.json"))
model = getattr(modeling, spec["class"])(**spec["kwargs"])
load_model(model, "model.safetensors")
model.eval()

{tokenizer}


tokenizer = types.SimpleNamespace(encode=encode, decode=decode)
'''

LM_GENERATE = '''

def generate(prompt, max_new_tokens=200, temperature=1.0, top_k=0, seed=0):
    """The prompt's continuation, sampled token by token by the O(1)-per-token recurrent twin
    (top_k=0: from every token)."""
    generator = torch.Generator().manual_seed(seed)
    return modeling.sample(model, tokenizer, [prompt], max_new_tokens, temperature, top_k,
                           generator, context={context})[0]
'''

SEQ2SEQ_GENERATE = '''
decoder = model.recurrent()  # the O(1)-per-token decoding twin, built once


def generate(source, max_new_tokens={max_target}, temperature=0.0, top_k=0, seed=0):
    """The output for a source text: greedy, or sampled when temperature > 0."""
    ids = encode(source)[:{max_source}]
    rows = decoder.decode(torch.tensor([ids]), torch.tensor([len(ids)]), BASE + 1, BASE + 2,
                          max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed))
    return decode(rows[0])
'''

SEQUENCE_README = """# {run_name}: {name} {kind} ({parameters:,} parameters)

Exported from the run `{run_dir}`, checkpoint `{checkpoint}`{ema}.
Validation metrics of these weights: {metrics}.

Files: `model.safetensors` (weights), `model.json` (the model's class and arguments),
`modeling/` (the model's code), {tokenizer_file}`config.yaml` (how it was trained).

Load and run it with PyTorch and pytorch-fast-transformers (run from this directory; needs
torch, pytorch-fast-transformers, safetensors{tokenizers}):

```python
{snippet}


print({example})
```
"""


def _logged_metrics(run_dir: Path, chosen: Path, ema: bool) -> str:
    """What the run logged about these weights, for the README."""
    step = int(chosen.name.rsplit("_", 1)[-1]) if chosen.name.startswith("step_") else None
    prefix = "val_ema/" if ema else "val/"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()
              if f'"{prefix}' in line]
    logged = [r for r in logged if r.get("step") == step]
    if not logged:
        return "not evaluated at this step"
    return ", ".join(f"{k.split('/')[1]} {v:.6g}" for k, v in logged[-1].items()
                     if k.startswith(prefix) and isinstance(v, float))


def _classifier_files(run_dir: Path, checkpoint_dir: Path | None, ema: bool) -> dict:
    from safetensors.torch import save_file

    from train.predict import load_classifier
    from train.tasks.classify import CLASSES_FILE

    model, transform, names, chosen = load_classifier(run_dir, checkpoint_dir, ema,
                                                      "train.export")
    name = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"]
    resize, crop = transform.prepare_steps
    kwargs = ", aux_logits=False, init_weights=False" if name in ("googlenet",
                                                                   "inception_v3") else ""
    snippet = CLASSIFIER_SNIPPET.format(
        name=name, num_classes=len(names), builder_kwargs=kwargs, resize=resize.size,
        crop=list(crop.size), interpolation=resize.interpolation.name,
        mean=[round(float(m), 6) for m in transform.mean.flatten()],
        std=[round(float(s), 6) for s in transform.std.flatten()])
    readme = CLASSIFIER_README.format(
        run_name=run_dir.name, name=name, num_classes=len(names), run_dir=run_dir,
        checkpoint=chosen.name, ema=" (the moving average of the weights)" if ema else "",
        metrics=_logged_metrics(run_dir, chosen, ema), snippet=snippet.rstrip())
    return {"model.safetensors": lambda path: save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, str(path)),
            CLASSES_FILE: json.dumps(names), "README.md": readme}


def _sequence_files(run_dir: Path, checkpoint_dir: Path | None, ema: bool) -> dict:
    from safetensors.torch import save_model

    import train.models
    from train.generate import load_run

    task, model, chosen = load_run(run_dir, ema, checkpoint_dir)
    seq2seq = task.generate_input == "source"
    tokenizer_file = getattr(task.tokenizer, "path", None)
    code = SEQUENCE_SNIPPET.format(
        tokenizer=(FILE_TOKENIZER if tokenizer_file else BYTE_TOKENIZER).strip())
    if seq2seq:
        code += SEQ2SEQ_GENERATE.format(max_source=task.config.data.max_source_length,
                                        max_target=task.config.data.max_target_length)
    else:
        code += LM_GENERATE.format(context=task.context_length)
    kind = "seq2seq model" if seq2seq else "language model"
    readme = SEQUENCE_README.format(
        run_name=run_dir.name, name=type(model).__name__, kind=kind,
        parameters=sum(p.numel() for p in model.parameters()), run_dir=run_dir,
        checkpoint=chosen.name, ema=" (the moving average of the weights)" if ema else "",
        metrics=_logged_metrics(run_dir, chosen, ema), snippet=code.rstrip(),
        tokenizer_file="`tokenizer.json` (the tokenizer), " if tokenizer_file else "",
        tokenizers=" and tokenizers" if tokenizer_file else "",
        example='generate("dcba")' if seq2seq else
        'generate("The ", max_new_tokens=200, temperature=0.8, top_k=40)')
    package = Path(train.models.__file__).parent
    files = {"model.safetensors": lambda path: save_model(model, str(path)),
             "model.json": json.dumps({"class": type(model).__name__, "kwargs": model.hparams},
                                      indent=2),
             f"{CODE_DIR}/__init__.py": CODE_INIT, "README.md": readme}
    files.update({f"{CODE_DIR}/{m}.py": (package / f"{m}.py").read_text()
                  for m in train.models.SEQUENCE_MODULES})
    if tokenizer_file:
        files["tokenizer.json"] = Path(tokenizer_file).read_bytes()
    return files


def export(run_dir: Path, out_dir: Path, checkpoint_dir: Path | None, ema: bool) -> Path:
    from train.tasks import load_run_config, task_spec

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not an empty directory; choose a new OUT_DIR")
    task = load_run_config(run_dir).task
    if task == "classify":
        files = _classifier_files(run_dir, checkpoint_dir, ema)
    elif task_spec(task).generates:
        files = _sequence_files(run_dir, checkpoint_dir, ema)
    else:
        raise ConfigError(f"{run_dir} trained a {task!r} model; train.export exports image "
                          "classifiers, language models and seq2seq models")
    files["config.yaml"] = (run_dir / "config.yaml").read_text()

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, content in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):  # writes the file itself
                content(path)
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
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
