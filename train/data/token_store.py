"""The token store: a corpus tokenized once into one flat file of token ids, read through
`numpy.memmap`, so that a run's memory stays flat whatever the corpus size.

    CACHE/tokens/KEY/
        tokens.bin   every document's tokens, each followed by EOS (uint16 when the
                     vocabulary fits, else uint32)
        index.npy    per segment of the source (<= 64 KiB of text): cumulative tokens and
                     bytes at its end, so a split can be cut at a segment boundary and its
                     original byte count is exact (bits per byte)
        meta.json    counts, dtype, what was built from what

KEY hashes the sources' identity (paths, sizes, mtimes; a builtin's content; a hub
fingerprint), the tokenizer's identity and the format version: the second run with the same
inputs opens the store at once. It is built in batches of segments (vectorized for bytes,
`encode_batch` for tokenizers), with a progress bar in MB/s, into a temporary directory that is
renamed into place when complete, so a killed build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from train.data.sources import TextSource, marked_segments, segment_bytes
from train.errors import ConfigError

FORMAT = 1
BATCH_BYTES = 16 << 20  # text per tokenizer call


def cache_root(configured: str | None = None) -> Path:
    return Path(configured or os.environ.get("TRAIN_CACHE") or Path.home() / ".cache" / "train")


def store_key(source_identity, tokenizer_identity: str, split: str, segment: int) -> str:
    blob = json.dumps([FORMAT, source_identity, tokenizer_identity, split, segment],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class TokenStore:
    path: Path
    meta: dict

    @property
    def tokens(self) -> np.memmap:
        return np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                         shape=(self.meta["tokens"],))

    @property
    def index(self) -> np.ndarray:
        return np.load(self.path / "index.npy")  # (segments, 2): tokens, bytes at each end

    def cut(self, val_fraction: float) -> tuple[int, int, int]:
        """(token offset where validation starts, train bytes, validation bytes): the segment
        boundary nearest to val_fraction of the bytes from the end (the last segment at
        least goes to validation)."""
        ends = self.index
        total, target = int(ends[-1, 1]), (1 - val_fraction) * int(ends[-1, 1])
        i = int(np.searchsorted(ends[:, 1], target))  # ends[i - 1] < target <= ends[i]
        if i > 0 and (i >= len(ends) - 1 or target - ends[i - 1, 1] < ends[i, 1] - target):
            i -= 1
        if i >= len(ends) - 1:
            return int(ends[-1, 0]), total, 0
        return int(ends[i, 0]), int(ends[i, 1]), total - int(ends[i, 1])


def open_store(source: TextSource, split: str, tokenizer, cache_dir: str | None = None,
               show_progress: bool = True) -> TokenStore:
    """The store of one split of `source`, built first if it is not in the cache."""
    segment = segment_bytes(source.size_estimate(split))
    path = cache_root(cache_dir) / "tokens" / store_key(source.identity, tokenizer.identity,
                                                         split, segment)
    meta_path = path / "meta.json"
    if meta_path.is_file():
        return TokenStore(path, json.loads(meta_path.read_text()))
    return _build(source, split, tokenizer, path, segment, show_progress)


def _build(source: TextSource, split: str, tokenizer, path: Path, segment_size: int,
           show_progress: bool) -> TokenStore:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot write the token cache under {path.parent} ({exc.strerror}); "
                          "set data.cache_dir or TRAIN_CACHE to a writable directory") from None
    started = time.perf_counter()
    bar = tqdm(total=source.size_estimate(split), unit="B", unit_scale=True,
               desc=f"tokenize {source.description} [{split}]", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True, mininterval=1.0)
    try:
        with open(tmp / "tokens.bin", "wb") as out:
            writer = _Writer(out, tokenizer, bar)
            for document in source.splits[split]:
                for segment, last in marked_segments(document.texts(), segment_size):
                    writer.add(segment, document.name, last)
            writer.flush()
        bar.close()
        if writer.counts["bytes"] == 0:
            raise ConfigError(f"data.source={source.description!r}: the {split} split holds no "
                              "text (empty files?)")
        np.save(tmp / "index.npy", np.concatenate(writer.index).astype(np.int64))
        meta = {"format": FORMAT, "dtype": np.dtype(tokenizer.dtype).name, **writer.counts,
                "segment_bytes": segment_size, "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer.identity, "source": source.description, "split": split,
                "first_file_with_replaced_bytes": writer.first_replaced,
                "build_seconds": round(time.perf_counter() - started, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same store first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            meta = json.loads((path / "meta.json").read_text())
        return TokenStore(path, meta)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Writer:
    """Tokenizes segments a batch at a time and appends them to tokens.bin, an EOS after each
    document's last one, and their cumulative (tokens, bytes) ends to the index."""

    def __init__(self, out, tokenizer, bar):
        self.out, self.tokenizer, self.bar = out, tokenizer, bar
        self.eos = np.asarray([tokenizer.eos_id], dtype=tokenizer.dtype)
        self.counts = {"tokens": 0, "bytes": 0, "documents": 0, "replaced_bytes": 0}
        self.first_replaced: str | None = None
        self.index: list[np.ndarray] = []  # (segments, 2) per batch
        self.batch: list[bytes] = []
        self.names: list[str] = []
        self.lasts: list[bool] = []
        self.pending = 0

    def add(self, segment: bytes, name: str, last: bool) -> None:
        self.batch.append(segment)
        self.names.append(name)
        self.lasts.append(last)
        self.pending += len(segment)
        if self.pending >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        arrays, replaced = self.tokenizer.encode_segments(self.batch)
        if self.first_replaced is None:
            self.first_replaced = next((n for n, r in zip(self.names, replaced) if r), None)
        lasts = np.asarray(self.lasts, dtype=bool)
        token_counts = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        byte_counts = np.fromiter(map(len, self.batch), dtype=np.int64, count=len(self.batch))
        # One write per batch: the segments' tokens, with EOS after each document's last one.
        tokens = np.insert(np.concatenate(arrays), np.cumsum(token_counts)[lasts], self.eos[0])
        self.out.write(tokens.tobytes())
        c = self.counts
        self.index.append(np.stack([c["tokens"] + np.cumsum(token_counts + lasts),
                                    c["bytes"] + np.cumsum(byte_counts)], axis=1))
        c["tokens"] += len(tokens)
        c["bytes"] += int(byte_counts.sum())
        c["documents"] += int(lasts.sum())
        c["replaced_bytes"] += sum(replaced)
        self.bar.update(int(byte_counts.sum()))
        self.batch, self.names, self.lasts, self.pending = [], [], [], 0


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of a token range as next-token examples: block i is
    tokens[start + i*L : start + i*L + L + 1] (input = [:-1], labels = [1:]); nothing per block
    is stored. With `pad_last`, a shorter last block is padded (labels IGNORE_INDEX), so an
    evaluation covers every token of the range.

    Blocks are read with pread, not through a memory map: for each random read of a mapped
    file the kernel maps whole page-cache folios (up to 2 MiB), so a process's resident memory
    would grow with the corpus (measured: +480 MiB for 640 random blocks of a 600 MB store);
    pread copies the block alone."""

    def __init__(self, store: TokenStore, start: int, end: int, block_size: int,
                 pad_last: bool = False):
        self.store_path, self.meta = store.path, store.meta
        self.start, self.end, self.block_size = start, end, block_size
        span = end - start - 1  # predicted tokens
        self.full = max(span, 0) // block_size
        self.length = self.full + (1 if pad_last and span > self.full * block_size else 0)
        self.itemsize = np.dtype(store.meta["dtype"]).itemsize
        self._fd = None  # opened in each process on first use (workers, spawn)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        try:
            if self._fd is not None:
                os.close(self._fd)
        except Exception:  # at interpreter exit the os module may be gone already
            pass

    def _rows(self, indices) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.store_path / "tokens.bin", os.O_RDONLY)
        L, size = self.block_size, self.itemsize
        out = np.full((len(indices), L + 1), -1, dtype=np.int64)
        for row, i in enumerate(indices):
            if not 0 <= i < self.length:
                raise IndexError(i)
            begin = self.start + i * L
            count = min(begin + L + 1, self.end) - begin
            data = os.pread(self._fd, count * size, begin * size)
            out[row, :count] = np.frombuffer(data, dtype=self.meta["dtype"])
        return out

    def __getitems__(self, indices: list[int]) -> list[dict]:
        from train.data import IGNORE_INDEX

        rows = torch.from_numpy(self._rows(indices))
        inputs, labels = rows[:, :-1].clamp(min=0), rows[:, 1:].clone()
        labels[labels < 0] = IGNORE_INDEX
        return [{"input_ids": x, "labels": y} for x, y in zip(inputs, labels)]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]
