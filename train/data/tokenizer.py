"""Tokenizers, named by `data.tokenizer` (the same key and meaning for every sequence task):

    byte           every byte is a token (ids 0..255); no vocabulary, no download
    PATH           a Hugging Face `tokenizer.json` (the `tokenizers` library)
    bpe:VOCAB      a byte-level BPE of VOCAB tokens trained in the run (see train_bpe)

Every tokenizer has three extra ids after its base vocabulary: PAD, BOS, EOS (EOS also
separates documents in a language model's token stream).

Tokenizers encode raw byte segments: the byte tokenizer never decodes; a text tokenizer decodes
UTF-8, replacing invalid bytes with U+FFFD and counting them.
"""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path

import numpy as np

from train.errors import ConfigError

BPE_PREFIX = "bpe:"


class _ReplacedBytes:
    """A codec error handler that replaces invalid UTF-8 by U+FFFD and counts the bytes."""

    name = "train.count-and-replace"

    def __init__(self):
        self.count = 0
        codecs.register_error(self.name, self)

    def __call__(self, error: UnicodeDecodeError):
        self.count += error.end - error.start
        return "\ufffd", error.end


_REPLACED = _ReplacedBytes()


def decode_counting(segment: bytes) -> tuple[str, int]:
    """(text, invalid bytes replaced)."""
    before = _REPLACED.count
    text = segment.decode("utf-8", errors=_REPLACED.name)
    return text, _REPLACED.count - before


class ByteTokenizer:
    """Every byte is a token (ids 0..255); 256..258 are PAD, BOS, EOS."""

    base_size = 256
    identity = "byte"

    def __init__(self):
        self.vocab_size = self.base_size + 3
        self.pad_id, self.bos_id, self.eos_id = range(self.base_size, self.base_size + 3)

    @property
    def dtype(self):
        """The smallest unsigned integer type that holds every id (for the token store)."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < self.base_size).decode("utf-8", errors="replace")

    def encode_segments(self, segments: list[bytes]) -> tuple[list[np.ndarray], list[int]]:
        """Token arrays of raw byte segments, and how many invalid bytes each had replaced."""
        joined = np.frombuffer(b"".join(segments), dtype=np.uint8).astype(self.dtype)
        return np.split(joined, np.cumsum([len(s) for s in segments[:-1]])), [0] * len(segments)


class FileTokenizer(ByteTokenizer):
    """A Hugging Face `tokenizer.json`; its own special tokens are left out of encode()."""

    def __init__(self, path: str | Path, key: str = "data.tokenizer"):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # a missing, unreadable or malformed file
            raise ConfigError(f"{key}={str(path)!r} is not a readable tokenizer.json "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        self.identity = "file:" + hashlib.sha256(data).hexdigest()
        self.base_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        super().__init__()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if i < self.base_size])

    def encode_segments(self, segments: list[bytes]) -> tuple[list[np.ndarray], list[int]]:
        texts, replaced = [], []
        for segment in segments:
            text, bad = decode_counting(segment)
            texts.append(text)
            replaced.append(bad)
        # On all cores (the library's Rust threads); the _fast variant skips character offsets.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings], replaced


def bpe_vocab_size(name: str) -> int | None:
    """VOCAB of `bpe:VOCAB`, None for other names; ConfigError if VOCAB is not a size."""
    if not name.startswith(BPE_PREFIX):
        return None
    try:
        size = int(name[len(BPE_PREFIX):])
    except ValueError:
        size = 0
    if not 257 <= size <= 1 << 24:
        raise ConfigError(f"data.tokenizer={name!r}: expected bpe:VOCAB with a vocabulary of "
                          "257 to 16777216 tokens, e.g. bpe:8192")
    return size


def train_bpe(texts, vocab_size: int, out: Path) -> FileTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization) of `vocab_size` tokens learned from the
    `texts` iterator with Hugging Face `tokenizers` (Rust, multi-threaded); saved at `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(out)
    return FileTokenizer(out)


def build_tokenizer(name: str) -> ByteTokenizer:
    """`byte`, or the path of a tokenizer.json (`bpe:VOCAB` is trained by the LM task)."""
    if name == "byte":
        return ByteTokenizer()
    if bpe_vocab_size(name) is not None:
        raise ConfigError(f"data.tokenizer={name!r}: a trained BPE is for task: lm; use 'byte' "
                          "or the path of a tokenizer.json")
    if not Path(name).expanduser().is_file():
        raise ConfigError(f"data.tokenizer={name!r}: no such file; use 'byte', bpe:VOCAB or the "
                          "path of a Hugging Face tokenizer.json")
    return FileTokenizer(Path(name).expanduser())
