"""Text sources for language modelling: where a corpus's bytes come from, as documents.

    data.source = builtin:NAME | FILE | DIR | GLOB | hub dataset name
        -> a TextSource: its splits, each an ordered list of documents (a file, or a row's text)
        -> documents read as byte segments of at most SEGMENT_BYTES, cut after a newline

Text files (any file that is not .json/.jsonl/.parquet/.csv) are read as raw bytes, never
decoded: a byte tokenizer sees every byte, and a text tokenizer decides how to decode.
`.gz` and `.zst` files are decompressed on the fly; `x.jsonl.gz` is a compressed jsonl file.
Structured files give the `data.text_column` of each row; a hub dataset (through `datasets`)
gives its own splits. Nothing here writes to disk.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from train.data import BUILTIN_PREFIX, load_hub_dataset
from train.errors import ConfigError

# Segments are the unit of tokenization (a batch of them goes to the tokenizer at once) and
# of the train/validation cut. A segment ends at a newline where the text has one; its size
# grows with the corpus (segment_bytes), so that even a small corpus is cut finely.
SEGMENT_BYTES = 1 << 16


def segment_bytes(corpus_bytes: int | None) -> int:
    """About 1/4096 of the corpus, between 512 B and 64 KiB (64 KiB when the size is unknown)."""
    if corpus_bytes is None:
        return SEGMENT_BYTES
    return 1 << min(16, max(9, (corpus_bytes // 4096).bit_length()))
STRUCTURED = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED = (".gz", ".zst")
VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
READ_BLOCK = 1 << 22


@dataclass
class Document:
    """A file of a corpus (or a hub split): `name` for messages, `read` yields its bytes in
    pieces. A text file is one document. With `rows`, each piece is a document of its own (a
    row's text): documents are separated by an EOS token in the token stream."""

    name: str
    read: Callable[[], Iterator[bytes]]
    size: int | None = None  # bytes on disk (compressed size for .gz/.zst), when known
    rows: bool = False
    spec: dict | None = None  # read_document(**spec) reads it again, in another process

    def texts(self) -> Iterator[Iterator[bytes]]:
        """Its documents, each as an iterator of byte pieces."""
        if self.rows:
            return (iter([row]) for row in self.read())
        return iter([self.read()])


@dataclass
class TextSource:
    description: str  # what the user named, for messages
    identity: list  # JSON-able; changes whenever the content may have changed (cache keys)
    splits: dict[str, list[Document]] = field(default_factory=dict)  # "all" or train/validation

    @property
    def has_val_split(self) -> bool:
        return "validation" in self.splits

    def size_estimate(self, split: str) -> int | None:
        sizes = [d.size for d in self.splits[split]]
        return None if None in sizes else sum(sizes)


def segments(pieces: Iterator[bytes], limit: int = SEGMENT_BYTES) -> Iterator[bytes]:
    """Re-cut a stream of byte pieces into segments of at most `limit` bytes, each ending
    after a newline unless a line is longer than `limit`."""
    pending = b""
    for piece in pieces:
        pending += piece
        while len(pending) >= limit:
            cut = pending.rfind(b"\n", 0, limit) + 1 or limit
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def marked_segments(texts: Iterator[Iterator[bytes]], limit: int = SEGMENT_BYTES
                    ) -> Iterator[tuple[bytes, bool]]:
    """(segment, is it its document's last) for the segments of each document in turn; an
    empty document has none."""
    for pieces in texts:
        previous = None
        for segment in segments(pieces, limit):
            if previous is not None:
                yield previous, False
            previous = segment
        if previous is not None:
            yield previous, True


def _open(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _read_file(path: Path) -> Iterator[bytes]:
    try:
        with _open(path) as f:
            while block := f.read(READ_BLOCK):
                yield block
    except (OSError, EOFError, ValueError) as exc:  # unreadable, truncated or corrupt archive
        raise ConfigError(f"data.source: cannot read {path} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    except Exception as exc:  # zstandard.ZstdError and the like
        raise ConfigError(f"data.source: cannot read {path} ({type(exc).__name__}: {exc})") from None


def _kind(path: Path) -> str | None:
    """'json'/'parquet'/'csv' for structured files (compressed or not), None for text."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return STRUCTURED.get(suffixes[-1]) if suffixes else None


def _rows(path: Path, kind: str, column: str) -> Iterator[bytes]:
    """The `column` text of each row of a structured file, UTF-8 encoded."""
    def missing(columns):
        raise ConfigError(f"data.text_column={column!r} is not a column of {path}; columns: "
                          f"{', '.join(map(str, columns))}")

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if column not in parquet.schema_arrow.names:
                missing(parquet.schema_arrow.names)
            for batch in parquet.iter_batches(columns=[column], batch_size=4096):
                for value in batch.column(0).to_pylist():
                    if value:
                        yield str(value).encode("utf-8", "surrogatepass")
            return
        if kind == "csv":
            import pyarrow.csv as pcsv

            reader = pcsv.open_csv(_open(path))
            if column not in reader.schema.names:
                missing(reader.schema.names)
            for batch in reader:
                for value in batch.column(reader.schema.get_field_index(column)).to_pylist():
                    if value:
                        yield str(value).encode("utf-8")
            return
        pieces = _read_file(path)
        head = next(pieces, b"")
        if head.lstrip()[:1] == b"[":  # one JSON array of rows
            rows = json.loads(head + b"".join(pieces))
        else:  # JSON lines
            rows = (json.loads(line) for line in _lines(itertools.chain([head], pieces))
                    if line.strip())
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict) or column not in row:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else "not an object"
                raise ConfigError(f"data.text_column={column!r}: row {number} of {path} has "
                                  f"no such key ({keys})")
            if row[column]:
                yield str(row[column]).encode("utf-8")
    except ConfigError:
        raise
    except (ValueError, OSError, EOFError) as exc:  # bad JSON/CSV/Parquet, unreadable file
        raise ConfigError(f"data.source: cannot read {path} as {kind} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    except Exception as exc:  # pyarrow's own error types
        raise ConfigError(f"data.source: cannot read {path} as {kind} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _lines(pieces: Iterator[bytes]) -> Iterator[bytes]:
    pending = b""
    for piece in pieces:
        *lines, pending = (pending + piece).split(b"\n")
        yield from lines
    if pending:
        yield pending


def _files_of(source: str) -> list[Path] | None:
    """The files a local source names (a file, a directory's files, a glob), or None when it
    names nothing local."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if glob.has_magic(source):
        return sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                      if Path(p).is_file())
    return None


def _local(source: str, files: list[Path], column: str) -> TextSource:
    if not files:
        raise ConfigError(f"data.source={source!r}: no files match it; pass a file, a directory "
                          "or a glob of text files")
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
        example = {k: next(p for p in files if _kind(p) == k) for k in kinds}
        raise ConfigError(f"data.source={source!r} mixes text and structured files (e.g. "
                          + ", ".join(str(p) for p in example.values())
                          + "); point it at files of one kind")
    kind = kinds.pop()
    stats = [p.stat() for p in files]

    def document(path: Path, size: int) -> Document:
        spec = {"path": str(path), "kind": kind, "column": column}
        if kind is None:
            return Document(str(path), lambda: _read_file(path), size, spec=spec)
        return Document(str(path), lambda: _rows(path, kind, column), size, rows=True, spec=spec)

    return TextSource(source, [[str(p), s.st_size, s.st_mtime_ns] for p, s in zip(files, stats)]
                      + [kind, column if kind else None],
                      {"all": [document(p, s.st_size) for p, s in zip(files, stats)]})


def read_document(path: str, kind: str | None, column: str) -> Iterator[Iterator[bytes]]:
    """The documents of a local file, each as an iterator of byte pieces: the whole file for
    text, one per row for structured files."""
    if kind is None:
        yield _read_file(Path(path))
    else:
        for row in _rows(Path(path), kind, column):
            yield iter([row])


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def _pydoc_topics(column: str) -> TextSource:
    from pydoc_data.topics import topics

    text = ("\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n").encode("utf-8")
    digest = hashlib.sha256(text).hexdigest()[:16]
    return TextSource("builtin:pydoc_topics", ["builtin:pydoc_topics", digest],
                      {"all": [Document("pydoc_topics", lambda: iter([text]), len(text))]})


def python_stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, sorted (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages", "__pycache__"} & set(p.parts))


def _python_stdlib(column: str) -> TextSource:
    files = python_stdlib_files()
    if not files:
        raise ConfigError("builtin:python_stdlib: this Python has no standard library sources")
    source = _local("builtin:python_stdlib", files, column)
    source.description = "builtin:python_stdlib"
    return source


BUILTINS = {"pydoc_topics": _pydoc_topics, "python_stdlib": _python_stdlib}


def _hub(name: str, column: str, streaming: bool) -> TextSource:
    loaded = load_hub_dataset(name, name, streaming=streaming)
    columns = loaded["train"].column_names
    if columns is not None and column not in columns:
        raise ConfigError(f"data.text_column={column!r} is not a column of {name!r}; columns: "
                          f"{', '.join(columns)}")

    def rows(split):
        for row in loaded[split]:
            if row[column]:
                yield str(row[column]).encode("utf-8")

    def split_documents(split: str) -> list[Document]:
        return [Document(f"{name}[{split}]", lambda: rows(split), rows=True)]

    val = next((n for n in VAL_SPLIT_NAMES if n in loaded), None)
    fingerprint = getattr(loaded["train"], "_fingerprint", None) or name
    splits = {"train": split_documents("train")}
    if val is not None:
        splits["validation"] = split_documents(val)
    source = TextSource(name, ["hub", name, fingerprint, column, val], splits)
    source.hub = loaded  # the datasets object itself, for streaming
    return source


def open_source(source: str, column: str = "text", streaming: bool = False) -> TextSource:
    """Resolve `data.source`; ConfigError naming the problem if it names nothing readable."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"data.source={source!r}: unknown builtin text; available: "
                              + ", ".join(BUILTIN_PREFIX + n for n in builtin_names()))
        return BUILTINS[name](column)
    files = _files_of(source)
    if files is not None:
        return _local(source, files, column)
    if source.startswith((".", "/", "~")) or Path(source).suffix or glob.has_magic(source):
        raise ConfigError(f"data.source={source!r}: no such file or directory")
    return _hub(source, column, streaming)
