"""Datasets of variable-length token sequences, padded per batch: seq2seq pairs and labelled
texts, through Hugging Face `datasets`.

    source -> rows (two text columns, or text + label) -> token ids (`datasets.map`)
           -> the loop's loaders (length-grouped training order) -> a pad-per-batch collate

Sources: `builtin:NAME` (made on the fly, no download; a fixed seed, so every run and process
sees the same data), a local .jsonl/.json/.csv/.parquet file or directory, or a hub dataset.
A source with a validation (or test) split uses it; otherwise a seeded permutation of the
rows is split off, so every process and run with the same seed sees the same split.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from train.data import BUILTIN_PREFIX, IGNORE_INDEX
from train.data.loaders import seeded_split
from train.errors import ConfigError

if TYPE_CHECKING:
    import datasets

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN_SEED = 1234  # the builtin data is a fixed benchmark, whatever the run's seed


def load_raw(source: str, split: str | None = "train"):
    """Raw rows of a local .jsonl/.json/.csv/.parquet file or directory, or a hub dataset: one
    split as a Dataset, or with split=None every split as a DatasetDict (local files hold one
    split, "train")."""
    import datasets  # here: a run that needs no padded data does not need the library

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


# --- builtin problems with a known right answer ---

def _letters(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _sort(rng):
    s = _letters(rng, string.ascii_lowercase, 3, 16)
    return s, "".join(sorted(s))


def _reverse(rng):
    s = _letters(rng, string.ascii_lowercase, 3, 16)
    return s, s[::-1]


def _add(rng):
    a, b = (rng.randrange(10 ** rng.randint(1, 4)) for _ in range(2))
    return f"{a}+{b}", str(a + b)


def _majority(rng):
    """Which of a, b, c occurs most often in a string of 5 to 60 letters (no ties)."""
    while True:
        s = _letters(rng, "abc", 5, 60)
        counts = sorted((s.count(c), c) for c in "abc")
        if counts[-1][0] > counts[-2][0]:
            return s, "abc".index(counts[-1][1])


BUILTIN_PAIRS = {"sort": _sort, "reverse": _reverse, "add": _add}
BUILTIN_LABELLED = {"majority": _majority}
BUILTIN_CLASSES = {"majority": ["a", "b", "c"]}


def _builtin_rows(make, count: int, val_fraction: float, first: str, second: str):
    """`count` distinct examples; the validation ones share no input with the training ones."""
    rng, seen, rows = random.Random(BUILTIN_SEED), set(), []
    for _ in range(count * 20):
        if len(rows) == count:
            break
        a, b = make(rng)
        if a not in seen:
            seen.add(a)
            rows.append((a, b))
    import datasets

    n_val = max(1, int(len(rows) * val_fraction))
    columns = lambda part: {first: [a for a, _ in part], second: [b for _, b in part]}  # noqa: E731
    return (datasets.Dataset.from_dict(columns(rows[n_val:])),
            datasets.Dataset.from_dict(columns(rows[:n_val])))


def _builtin(source: str, table: dict, cfg, first: str, second: str):
    name = source[len(BUILTIN_PREFIX):]
    if name not in table:
        known = ", ".join(BUILTIN_PREFIX + n for n in table)
        raise ConfigError(f"data.source={source!r}: unknown builtin; available: {known}")
    return _builtin_rows(table[name], cfg.builtin_examples, cfg.val_fraction, first, second)


def train_val_rows(source: str, val_fraction: float, seed: int):
    """(train, validation) raw rows of a local or hub source."""
    splits = load_raw(source, split=None)
    if "train" not in splits:
        raise ConfigError(f"data.source={source!r} has no 'train' split; splits: "
                         f"{', '.join(splits)}")
    val_name = next((n for n in VAL_SPLIT_NAMES if n in splits), None)
    if val_name is not None:
        return splits["train"], splits[val_name]
    rows = splits["train"]
    if len(rows) < 2:
        raise ConfigError(f"data.source={source!r} holds {len(rows)} rows; need at least 2")
    train_indices, val_indices = seeded_split(len(rows), val_fraction, seed)
    return rows.select(train_indices), rows.select(val_indices)


def _check_columns(rows: datasets.Dataset, source: str, **columns: str) -> None:
    for key, column in columns.items():
        if column not in rows.column_names:
            raise ConfigError(f"data.{key}={column!r} is not a column of {source!r}; columns: "
                             f"{', '.join(rows.column_names)}")


def _drop_empty(rows: datasets.Dataset, what: str, *columns: str) -> datasets.Dataset:
    kept = rows.filter(lambda row: all(len(row[c]) > 0 for c in columns), desc=f"drop empty {what}")
    if len(kept) == 0:
        raise ConfigError(f"every {what} row is empty after tokenization")
    return kept


# --- seq2seq pairs ---

def pair_datasets(cfg, tokenizer, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) rows of {"source_ids", "target_ids"}; `cfg` is a PairDataConfig."""
    if cfg.source.startswith(BUILTIN_PREFIX):
        train, val = _builtin(cfg.source, BUILTIN_PAIRS, cfg, "source", "target")
        columns = ("source", "target")
    else:
        train, val = train_val_rows(cfg.source, cfg.val_fraction, seed)
        for rows in (train, val):
            _check_columns(rows, cfg.source, source_column=cfg.source_column,
                           target_column=cfg.target_column)
        columns = (cfg.source_column, cfg.target_column)

    def tokenize(batch):
        # Targets leave room for EOS within max_target_length decoding steps.
        return {"source_ids": [tokenizer.encode(str(t))[: cfg.max_source_length]
                               for t in batch[columns[0]]],
                "target_ids": [tokenizer.encode(str(t))[: cfg.max_target_length - 1]
                               for t in batch[columns[1]]]}

    out = []
    for name, rows in (("train", train), ("validation", val)):
        rows = rows.map(tokenize, batched=True, remove_columns=rows.column_names,
                        desc=f"tokenize {name}")
        out.append(_drop_empty(rows, name, "source_ids"))
    return out[0], out[1]


class PadPairs:
    """Collate {"source_ids", "target_ids"} rows into padded tensors:
    source (N, S) + source_lengths (N,); target_in = [BOS, y...] (N, T); labels = [y..., EOS]
    (N, T) with IGNORE_INDEX on the padding."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int):
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sources = [r["source_ids"] for r in rows]
        targets = [r["target_ids"] for r in rows]
        source, source_lengths = pad_rows(sources, self.pad_id)
        return {"source": source, "source_lengths": source_lengths,
                "target_in": pad_rows([[self.bos_id, *t] for t in targets], self.pad_id)[0],
                "labels": pad_rows([[*t, self.eos_id] for t in targets], IGNORE_INDEX)[0]}


def pad_rows(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (N, longest) tensor padded at the end with `value`, and the (N,) lengths.
    One tensor is made from all tokens at once: per-row tensors cost more than the model's step
    for short rows."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.full((len(rows), int(lengths.max())), value)
    out[torch.arange(out.shape[1]) < lengths[:, None]] = torch.tensor(
        [token for row in rows for token in row], dtype=torch.long)
    return out, lengths


# --- labelled texts ---

def labelled_text_datasets(cfg, tokenizer, seed: int):
    """(train, val, class names) with rows {"ids", "label"}; `cfg` is a LabelledTextDataConfig.
    String labels are numbered in sorted order; integer labels are used as they are."""
    if cfg.source.startswith(BUILTIN_PREFIX):
        train, val = _builtin(cfg.source, BUILTIN_LABELLED, cfg, "text", "label")
        classes = BUILTIN_CLASSES[cfg.source[len(BUILTIN_PREFIX):]]
        text_column, label_column = "text", "label"
    else:
        train, val = train_val_rows(cfg.source, cfg.val_fraction, seed)
        text_column, label_column = cfg.text_column, cfg.label_column
        for rows in (train, val):
            _check_columns(rows, cfg.source, text_column=text_column, label_column=label_column)
        classes = _class_names(train, label_column)
    index = {name: i for i, name in enumerate(classes)} if classes else None

    def to_index(label):
        if index is None or isinstance(label, int) and not isinstance(label, bool):
            return int(label)
        if str(label) not in index:
            raise ConfigError(f"label {label!r} of the validation data is not among the training "
                             f"labels ({', '.join(classes)})")
        return index[str(label)]

    def tokenize(batch):
        return {"ids": [tokenizer.encode(str(t))[: cfg.max_length] for t in batch[text_column]],
                "label": [to_index(x) for x in batch[label_column]]}

    out = []
    for name, rows in (("train", train), ("validation", val)):
        rows = rows.map(tokenize, batched=True, remove_columns=rows.column_names,
                        desc=f"tokenize {name}")
        out.append(_drop_empty(rows, name, "ids"))
    if classes is None:  # integer labels without names
        top = max(max(out[0]["label"]), max(out[1]["label"]))
        if min(min(out[0]["label"]), min(out[1]["label"])) < 0:
            raise ConfigError(f"data.label_column={label_column!r} holds negative labels")
        classes = [str(i) for i in range(top + 1)]
    return out[0], out[1], classes


def _class_names(rows: datasets.Dataset, column: str) -> list[str] | None:
    import datasets

    feature = rows.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if feature.dtype in ("string", "large_string"):
        return sorted(set(rows[column]))
    if feature.dtype.startswith(("int", "uint", "bool")):
        return None
    raise ConfigError(f"data.label_column={column!r} holds {feature.dtype} values; labels must be "
                     "integers or strings")


class PadTexts:
    """Collate {"ids", "label"} rows into ids (N, L) padded, lengths (N,), labels (N,)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, lengths = pad_rows([r["ids"] for r in rows], self.pad_id)
        return {"ids": ids, "lengths": lengths,
                "labels": torch.tensor([int(r["label"]) for r in rows])}


def sample_lengths(rows: datasets.Dataset, *columns: str) -> list[int]:
    """Tokens per row (summed over columns), for length-grouped batching."""
    per_column = [[len(x) for x in rows[c]] for c in columns]
    return [sum(n) for n in zip(*per_column)]
