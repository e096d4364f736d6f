"""A language-modelling corpus, ready to train on:

    data.source -> TextSource (sources.py) -> [a BPE trained on a sample of the training part]
                -> token store per split (token_store.py) -> train / validation TokenBlocks

Validation is the source's own validation (or test) split when it has one (hub datasets),
else the tail `val_fraction` of the corpus's bytes, cut at a segment boundary so that no
training block overlaps a validation block.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from train.data.sources import TextSource, open_source, segments
from train.data.token_store import TokenBlocks, cache_root, open_store
from train.data.tokenizer import ByteTokenizer, FileTokenizer, bpe_vocab_size, train_bpe
from train.data.tokenizer import decode_counting
from train.errors import ConfigError


@dataclass
class Corpus:
    train: TokenBlocks
    val: TokenBlocks
    val_tokens: int
    val_bytes: int  # of the original text: bits per byte = nats per token * tokens/bytes / ln 2
    replaced_bytes: int  # invalid UTF-8 replaced by U+FFFD (text tokenizers only)


def bpe_tokenizer(cfg, source: TextSource, vocab: int) -> FileTokenizer:
    """A byte-level BPE learned from up to data.tokenizer_sample_mb of the training part,
    spread evenly over it; cached by the corpus's identity and the settings."""
    key = hashlib.sha256(json.dumps([1, source.identity, vocab, cfg.tokenizer_sample_mb,
                                     cfg.val_fraction]).encode()).hexdigest()[:24]
    path = cache_root(cfg.cache_dir) / "tokenizers" / f"bpe-{vocab}-{key}.json"
    if path.is_file():
        return FileTokenizer(path)
    split = "train" if "train" in source.splits else "all"
    estimate = source.size_estimate(split)
    train_part = None if estimate is None or split == "train" else estimate * (1 - cfg.val_fraction)
    budget = cfg.tokenizer_sample_mb << 20
    stride = max(1, math.ceil((train_part or budget) / budget))

    def sample():
        taken = seen = count = 0
        for document in source.splits[split]:
            for piece in segments(document.read()):
                seen, count = seen + len(piece), count + 1
                if train_part is not None and seen > train_part:
                    return
                if count % stride == 0:
                    taken += len(piece)
                    yield decode_counting(piece)[0]
                    if taken >= budget:
                        return

    print(f"training a {vocab}-token BPE on up to {cfg.tokenizer_sample_mb} MB of "
          f"{source.description}", file=sys.stderr)
    return train_bpe(sample(), vocab, path)


def load_tokenizer(name: str, cfg=None, source: TextSource | None = None,
                   run_dir: Path | None = None):
    """The run's tokenizer: `byte`, a tokenizer.json path, or `bpe:VOCAB`: the run's own
    RUN_DIR/tokenizer.json when it has one (resume, generate), else trained (needs `source`)."""
    vocab = bpe_vocab_size(name)
    if name == "byte":
        return ByteTokenizer()
    if vocab is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.tokenizer={name!r}: no such file; use 'byte', bpe:VOCAB or "
                              "the path of a Hugging Face tokenizer.json")
        return FileTokenizer(path)
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return FileTokenizer(run_dir / "tokenizer.json")
    if source is None:
        return None  # trained with the data
    return bpe_tokenizer(cfg, source, vocab)


def prepare(cfg, tokenizer, show_progress: bool = True):
    """(Corpus, tokenizer) for an LM `data` config; `tokenizer` None means train the BPE."""
    source = open_source(cfg.source, cfg.text_column, cfg.streaming)
    if tokenizer is None:
        tokenizer = bpe_tokenizer(cfg, source, bpe_vocab_size(cfg.tokenizer))
    L = cfg.block_size
    if cfg.streaming:
        return _streaming(cfg, source, tokenizer, show_progress), tokenizer
    if source.has_val_split:
        train_store = open_store(source, "train", tokenizer, cfg.cache_dir, show_progress)
        val_store = open_store(source, "validation", tokenizer, cfg.cache_dir, show_progress)
        train_end = train_store.meta["tokens"]
        val_range, val_bytes = (0, val_store.meta["tokens"]), val_store.meta["bytes"]
    else:
        train_store = val_store = open_store(source, "all", tokenizer, cfg.cache_dir,
                                             show_progress)
        if train_store.meta["tokens"] <= L + 1:
            raise ConfigError(f"data.source={cfg.source!r} holds {train_store.meta['tokens']:,} "
                              f"tokens, shorter than one block of data.block_size={L} (+ 1); "
                              "lower data.block_size or add text")
        train_end, _, val_bytes = train_store.cut(cfg.val_fraction)
        val_range = (train_end, train_store.meta["tokens"])
    replaced = train_store.meta["replaced_bytes"] + (
        val_store.meta["replaced_bytes"] if val_store is not train_store else 0)
    train = TokenBlocks(train_store, 0, train_end, L)
    val = TokenBlocks(val_store, *val_range, L, pad_last=True)
    if len(train) == 0:
        raise ConfigError(f"data.block_size={L} is longer than the training part of "
                          f"{cfg.source!r} ({max(train_end - 1, 0):,} tokens to predict); lower "
                          "data.block_size or add text")
    if len(val) == 0:
        raise ConfigError(f"the validation part of {cfg.source!r} holds no token to predict; "
                          "raise data.val_fraction or add text")
    if replaced:
        first = train_store.meta.get("first_file_with_replaced_bytes") or val_store.meta.get(
            "first_file_with_replaced_bytes")
        print(f"data: {replaced:,} bytes of invalid UTF-8 were decoded as U+FFFD (first in "
              f"{first})", file=sys.stderr)
    return Corpus(train, val, val_range[1] - val_range[0], val_bytes, replaced), tokenizer


def _streaming(cfg, source: TextSource, tokenizer, show_progress: bool) -> Corpus:
    from train.data.streaming import split_stream, stream_blocks

    train_documents, val_source = split_stream(source, cfg.val_fraction)
    val_store = open_store(val_source, "validation", tokenizer, cfg.cache_dir, show_progress)
    val = TokenBlocks(val_store, 0, val_store.meta["tokens"], cfg.block_size, pad_last=True)
    if len(val) == 0:
        raise ConfigError(f"the validation part of {cfg.source!r} holds no token to predict")
    train = stream_blocks(source, train_documents, tokenizer, cfg.block_size, cfg.text_column)
    return Corpus(train, val, val_store.meta["tokens"], val_store.meta["bytes"],
                  val_store.meta["replaced_bytes"])
