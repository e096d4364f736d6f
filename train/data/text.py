"""Text datasets for language modelling, through Hugging Face `datasets`.

source -> raw text rows -> byte tokens (`datasets.map`, cached on disk) -> blocks of
`block_size + 1` tokens (input = block[:-1], labels = block[1:]). The validation split is the
tail of the source, so no training block overlaps a validation block.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets

from train.errors import ConfigError
from train.data.tokenizer import ByteTokenizer

BUILTIN_PREFIX = "builtin:"
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
                 ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
IGNORE_INDEX = -100


def _cache_dir() -> Path:
    root = os.environ.get("TRAIN_CACHE", Path.home() / ".cache" / "train")
    return Path(root)


def builtin_text(name: str) -> Path:
    """Text that ships with Python itself, written once to a cache file so `datasets` can load
    (and cache the tokenization of) it like any other local file."""
    if name != "pydoc_topics":
        raise ConfigError(f"unknown builtin text {name!r}; available: builtin:pydoc_topics")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    path = _cache_dir() / "builtin" / f"pydoc_topics-{digest}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def load_raw(source: str, split: str | None = "train"):
    """Raw rows from a builtin name, local file/dir, or hub name: one split as a Dataset, or
    with split=None every split as a DatasetDict (local files hold one split, "train")."""
    if source.startswith(BUILTIN_PREFIX):
        return datasets.load_dataset("text", data_files=str(builtin_text(source[len(BUILTIN_PREFIX):])),
                                     split=split)
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
        if None in kinds or len(kinds) != 1:
            raise ConfigError(
                f"data.source={source!r}: expected files of one kind among "
                f"{', '.join(sorted(FILE_BUILDERS))}; found {sorted({p.suffix for p in files})}")
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split=split)
    if path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/", "~")):
        raise ConfigError(f"data.source={source!r}: no such file or directory")
    try:  # anything else is a Hugging Face hub dataset name
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types (not found, offline, gated, ...)
        raise ConfigError(f"data.source={source!r} is neither a local path nor a loadable hub "
                         f"dataset ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def lm_blocks(raw: datasets.Dataset, text_column: str, block_size: int,
              tokenizer: ByteTokenizer) -> datasets.Dataset:
    """Tokenize rows and pack the token stream into (input_ids, labels) blocks."""
    if text_column not in raw.column_names:
        raise ConfigError(f"data.text_column={text_column!r} is not a column of the dataset; "
                         f"columns: {', '.join(raw.column_names)}")
    newline = tokenizer.encode("\n")

    def tokenize(batch):
        # The "text" builder strips line ends; put them back so the model sees real text.
        return {"ids": [tokenizer.encode(t) + newline for t in batch[text_column]]}

    def pack(batch):
        stream = [i for ids in batch["ids"] for i in ids]
        span = block_size + 1
        starts = range(0, max(len(stream) - 1, 0), block_size)
        blocks = [stream[s:s + span] for s in starts]
        inputs, labels = [], []
        for block in blocks:
            if len(block) < 2:
                continue
            pad = span - len(block)  # only the last block of a batch can be short
            inputs.append(block[:-1] + [0] * pad)
            labels.append(block[1:] + [IGNORE_INDEX] * pad)
        return {"input_ids": inputs, "labels": labels}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names,
                     desc="tokenize")
    blocks = tokens.map(pack, batched=True, batch_size=2000, remove_columns=["ids"], desc="pack")
    return blocks.with_format("torch")


def lm_datasets(source: str, text_column: str, block_size: int, val_fraction: float,
                tokenizer: ByteTokenizer) -> tuple[datasets.Dataset, datasets.Dataset]:
    raw = load_raw(source)
    if len(raw) < 2:
        raise ConfigError(f"data.source={source!r} holds {len(raw)} rows; need at least 2")
    n_val = max(1, int(len(raw) * val_fraction))
    train_raw = raw.select(range(len(raw) - n_val))
    val_raw = raw.select(range(len(raw) - n_val, len(raw)))
    return (lm_blocks(train_raw, text_column, block_size, tokenizer),
            lm_blocks(val_raw, text_column, block_size, tokenizer))
