"""Tokenizers. The byte tokenizer needs no vocabulary file or download; a user tokenizer is any
Hugging Face `tokenizer.json` (the `tokenizers` library).

Padded-sequence tasks need three extra ids, PAD, BOS and EOS, placed after the base vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from train.errors import ConfigError


class ByteTokenizer:
    """Every UTF-8 byte is a token (ids 0..255); with `specials`, 256..258 are PAD, BOS, EOS."""

    base_size = 256

    def __init__(self, specials: bool = False):
        self.vocab_size = self.base_size + (3 if specials else 0)
        if specials:
            self.pad_id, self.bos_id, self.eos_id = range(self.base_size, self.base_size + 3)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < self.base_size).decode("utf-8", errors="replace")


class FileTokenizer(ByteTokenizer):
    """A Hugging Face `tokenizer.json`; its own special tokens are left out of encode()."""

    def __init__(self, path: str, specials: bool = False):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # a missing, unreadable or malformed file
            raise ConfigError(f"data.tokenizer={path!r} is not a readable tokenizer.json "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        self.base_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        super().__init__(specials)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if i < self.base_size])


def build_tokenizer(name: str, specials: bool = False) -> ByteTokenizer:
    """`byte`, or the path of a tokenizer.json."""
    if name == "byte":
        return ByteTokenizer(specials)
    if not Path(name).expanduser().is_file():
        raise ConfigError(f"data.tokenizer={name!r}: no such file; use 'byte' or the path of a "
                          "Hugging Face tokenizer.json")
    return FileTokenizer(str(Path(name).expanduser()), specials)
