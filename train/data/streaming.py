"""Streaming language-modelling data (`data.streaming: true`), for corpora bigger than the disk:
nothing is tokenized ahead; the loader workers read, tokenize and pack blocks on the fly.

    local files / hub split -> datasets.IterableDataset (one shard per file)
        -> split_dataset_by_node (in the loaders: each rank its shards, or every world-th row)
        -> map(tokenize + pack into blocks of block_size + 1, batched) -> StatefulDataLoader

Where the stream stands (the shard and row of every worker, through datasets' own state_dict)
is saved in each checkpoint per rank, so a resumed run continues where it stopped; the order is
the files' order, with no shuffle buffer (its contents could not be restored). A batch of
segments is packed on its own: its last partial block (under block_size tokens) is dropped.

Validation is the source's own validation split, or else its last files (val_fraction of them,
at least one), which the training stream then leaves out; it is tokenized into a token store
and evaluated exactly like a non-streaming run's.
"""

from __future__ import annotations

import numpy as np

from train.data.sources import Document, TextSource, marked_segments, read_document

PACK_BATCH = 64  # segments (<= 64 KiB each) per packing call


def _segments_of(documents: list[dict]):
    """Rows {"data": bytes, "last": bool} of the documents (a shard = one file)."""
    for document in documents:
        for segment, last in marked_segments(read_document(**document)):
            yield {"data": segment, "last": last}


def split_stream(source: TextSource, val_fraction: float) -> tuple[list[Document], TextSource]:
    """(the training documents, a source holding the validation split only)."""
    if source.has_val_split:
        val = TextSource(source.description, source.identity + ["validation"],
                         {"validation": source.splits["validation"]})
        return source.splits["train"], val
    documents = source.splits["all"]
    if len(documents) < 2:
        from train.errors import ConfigError

        raise ConfigError(f"data.streaming=true holds the last files out for validation, but "
                          f"{source.description!r} is one file; split it, or stream without "
                          "data.streaming")
    n_val = min(len(documents) - 1, max(1, round(len(documents) * val_fraction)))
    val = TextSource(source.description, source.identity + ["stream-validation", n_val],
                     {"validation": documents[-n_val:]})
    return documents[:-n_val], val


def stream_blocks(source: TextSource, documents: list[Document], tokenizer, block_size: int,
                  text_column: str):
    """A datasets.IterableDataset of {"input_ids", "labels"} blocks: one shard per local file,
    or the hub dataset's own shards."""
    import datasets

    span = block_size + 1
    eos = tokenizer.eos_id

    def pack(batch):
        arrays, _ = tokenizer.encode_segments(batch["data"])
        parts = []
        for array, last in zip(arrays, batch["last"]):
            parts.append(array.astype(np.int64))
            if last:
                parts.append(np.asarray([eos], dtype=np.int64))
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        n = max(len(stream) - 1, 0) // block_size
        blocks = stream[np.arange(n)[:, None] * block_size + np.arange(span)]
        return {"input_ids": blocks[:, :-1].tolist(), "labels": blocks[:, 1:].tolist()}

    if getattr(source, "hub", None) is not None:  # a hub dataset's own streaming shards
        rows = datasets.load_dataset(source.description, split="train", streaming=True)
        rows = rows.map(lambda b: {"data": [str(t).encode("utf-8") for t in b[text_column]],
                                   "last": [True] * len(b[text_column])},
                        batched=True, remove_columns=rows.column_names)
    else:
        rows = datasets.IterableDataset.from_generator(
            _segments_of, gen_kwargs={"documents": [d.spec for d in documents]},
            features=datasets.Features({"data": datasets.Value("binary"),
                                        "last": datasets.Value("bool")}))
    packed = rows.map(pack, batched=True, batch_size=PACK_BATCH, remove_columns=["data", "last"])
    return packed.with_format("torch")
