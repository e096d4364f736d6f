"""Language-model corpora as users bring them: any bytes, files, globs, compressed and
structured files, BPE tokenizers trained in the run, the token store and its cache, samplers
that scale to 10^9 blocks, streaming with exact resume, and one clear error for bad input."""

import gzip
import json
import multiprocessing
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_exported_readme, train_here
from train.data.corpus import load_tokenizer, prepare
from train.data.loaders import ResumableDistributedSampler
from train.data.sources import open_source, python_stdlib_files
from train.data.token_store import open_store
from train.data.tokenizer import ByteTokenizer
from train.errors import ConfigError, StoppedBySignal
from train.tasks.lm import TextDataConfig

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "data.tokenizer=byte", "data.block_size=32", "data.batch_size=8", "optim.warmup_steps=2",
        "lm.sample_tokens=8", "wandb.mode=disabled", "progress_bar=false"]
NOT_UTF8 = b"caf\xe9 \xb1\xff\n"  # latin-1 and stray bytes: not UTF-8


def _cfg(tmp_path, source, **data):
    return TextDataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **data)


def _tokens(store) -> list[int]:
    return store.tokens.tolist()


def _text_files(root: Path, n: int = 6, size: int = 3000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [f"file {i} line {j}: the quick brown fox jumps over the lazy dog\n"
                 for j in range(size // 60)]
        (root / f"part{i:02d}.txt").write_text("".join(lines))
    return root


# --- any bytes in ---

def test_byte_tokens_are_the_files_bytes_exactly_whatever_they_are(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"hello\n" + NOT_UTF8)
    (tmp_path / "d" / "b.py").write_bytes(b"\x00\x01binary\x80")
    tok = ByteTokenizer()
    store = open_store(open_source(str(tmp_path / "d")), "all", tok, str(tmp_path / "cache"),
                       show_progress=False)
    assert _tokens(store) == [*b"hello\n", *NOT_UTF8, tok.eos_id, *b"\x00\x01binary\x80",
                              tok.eos_id]
    assert store.meta["bytes"] == 6 + len(NOT_UTF8) + 9 and store.meta["replaced_bytes"] == 0


def test_a_text_tokenizer_replaces_invalid_utf8_and_says_how_much(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    _text_files(tmp_path / "d", n=3)
    (tmp_path / "d" / "part99.txt").write_bytes(NOT_UTF8 * 40)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["the quick brown fox"], trainers.BpeTrainer(
        vocab_size=50, special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    cfg = _cfg(tmp_path, tmp_path / "d", tokenizer=str(tmp_path / "tokenizer.json"),
               block_size=8)
    corpus, _ = prepare(cfg, load_tokenizer(cfg.tokenizer), show_progress=False)
    assert corpus.replaced_bytes == 3 * 40  # \xe9, \xb1, \xff in each of 40 lines
    err = capsys.readouterr().err
    assert "120 bytes of invalid UTF-8 were decoded as U+FFFD" in err and "part99.txt" in err


def test_compressed_files_and_globs_give_the_same_tokens(tmp_path):
    import zstandard

    plain = _text_files(tmp_path / "plain", n=3)
    packed = tmp_path / "packed"
    packed.mkdir()
    for i, path in enumerate(sorted(plain.iterdir())):
        data = path.read_bytes()
        if i % 2:
            (packed / (path.name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (packed / (path.name + ".zst")).write_bytes(zstandard.compress(data))
    tok, cache = ByteTokenizer(), str(tmp_path / "cache")
    want = _tokens(open_store(open_source(str(plain)), "all", tok, cache, False))
    got = _tokens(open_store(open_source(str(packed / "*")), "all", tok, cache, False))
    assert got == want


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "jsonl.gz"])
def test_structured_rows_are_documents(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": f"row {i} é"} for i in range(5)]
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        pcsv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    tok = ByteTokenizer()
    store = open_store(open_source(str(path), "body"), "all", tok, str(tmp_path / "c"), False)
    want = [t for r in rows for t in [*r["body"].encode(), tok.eos_id]]
    assert _tokens(store) == want and store.meta["documents"] == 5


# --- bad input: one line, exit 2, nothing written ---

def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(np.random.default_rng(0).bytes(
        20000))[:5000])  # truncated
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    return [
        (f"data.source={tmp_path}/missing.txt", "no such file or directory"),
        (f"data.source={tmp_path}/nothing-*.txt", "no files match it"),
        ("data.source=builtin:nope", "unknown builtin text"),
        (f"data.source={tmp_path}/empty.txt", "holds no text"),
        (f"data.source={tmp_path}/short.txt", "shorter than one block of data.block_size=32"),
        (f"data.source={tmp_path}/rows.jsonl", "row 2 of"),
        (f"data.source={tmp_path}/broken.txt.gz", "cannot read"),
        (f"data.source={tmp_path}/bad.parquet", "cannot read"),
        ("data.tokenizer=bpe:12", "257 to 16777216 tokens"),
        (f"data.tokenizer={tmp_path}/none.json", "data.tokenizer="),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, case):
    override, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "run"
    _, error = train_here(LM_TINY, f"output_dir={out}", *TINY, override)  # override last
    assert isinstance(error, ConfigError) and error.exit_code == 2, error
    assert message in str(error) and "\n" not in str(error)
    assert not out.exists()


# --- the token store ---

def test_the_store_is_built_once_and_rebuilt_when_a_file_changes(tmp_path):
    files = _text_files(tmp_path / "d")
    tok, cache = ByteTokenizer(), str(tmp_path / "cache")
    first = open_store(open_source(str(files)), "all", tok, cache, False)
    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    again = open_store(open_source(str(files)), "all", tok, cache, False)
    assert again.path == first.path and (again.path / "tokens.bin").stat().st_mtime_ns == stamp
    (files / "part00.txt").write_text("changed\n")
    changed = open_store(open_source(str(files)), "all", tok, cache, False)
    assert changed.path != first.path and _tokens(changed)[:8] == list(b"changed\n")
    assert not list(Path(cache).glob("tokens/.tmp-*"))  # nothing half-built left behind


def test_the_store_takes_two_bytes_per_token(tmp_path):
    files = _text_files(tmp_path / "d", n=40, size=50_000)  # 2 MB
    cfg = _cfg(tmp_path, files)
    corpus, _ = prepare(cfg, load_tokenizer("byte"), show_progress=False)
    on_disk = sum(p.stat().st_size for p in Path(cfg.cache_dir).rglob("*") if p.is_file())
    tokens = corpus.train.end + corpus.val_tokens
    assert on_disk / tokens <= 2.1, on_disk / tokens


def test_python_stdlib_is_a_real_corpus_with_bytes_that_are_not_utf8(tmp_path):
    files = python_stdlib_files()
    assert len(files) > 500 and any("encoded_modules" in str(p) or "tokenizedata" in str(p)
                                    for p in files)
    tok = ByteTokenizer()
    store = open_store(open_source("builtin:python_stdlib"), "all", tok, str(tmp_path), False)
    assert store.meta["bytes"] == sum(p.stat().st_size for p in files)
    non_empty = sum(p.stat().st_size > 0 for p in files)
    assert store.meta["tokens"] == store.meta["bytes"] + non_empty  # + an EOS after each file
    assert store.meta["dtype"] == "uint16"


# --- BPE trained in the run ---

def test_a_bpe_trained_in_the_run_is_kept_reused_sampled_from_and_exported(tmp_path, capsys):
    from train.export import main as export
    from train.generate import main as generate

    files = _text_files(tmp_path / "d", n=8)
    out = tmp_path / "run"
    args = [*TINY, f"output_dir={out}", f"data.source={files}", "data.tokenizer=bpe:300",
            "max_steps=4", "log_every=2", "eval_every=4", "checkpoint_every=2",
            "model.tie_embeddings=true", "model.norm=pre"]
    rows, error = train_here(LM_TINY, *args)
    assert error is None
    saved = (out / "tokenizer.json").read_bytes()
    assert json.loads(saved)["model"]["type"] == "BPE"
    assert (out / "checkpoints" / "step_00000004" / "tokenizer.json").read_bytes() == saved
    final = [r for r in rows if "val/bpb" in r][-1]
    # Bits per byte of the text: the loss per token times tokens per byte (< 1 with BPE).
    assert final["val/bpb"] < final["val/loss"] / np.log(2)
    rows, error = train_here(LM_TINY, *[a.replace("max_steps=4", "max_steps=6") for a in args])
    assert error is None and (out / "tokenizer.json").read_bytes() == saved
    assert generate([str(out), "--prompt", "the quick", "--max-new-tokens", "40",
                     "--temperature", "0.9", "--top-k", "50", "--seed", "5"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith("the quick") and len(sampled) > len("the quick\n")

    # Exported (tokenizer.json beside it), it samples the same text without this project.
    exported = tmp_path / "export"
    assert export([str(out), str(exported)]) == 0
    assert (exported / "tokenizer.json").read_bytes() == saved
    assert run_exported_readme(
        exported, 'print("the quick" + generate("the quick", 40, 0.9, 50, 5))') == sampled


# --- samplers that scale ---

class _Virtual(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_the_epoch_order_of_a_billion_samples_needs_no_list_and_resumes_exactly():
    n, skip = 10**9, 123_456_789
    tracemalloc.start()
    ranks = [ResumableDistributedSampler(_Virtual(n), num_replicas=2, rank=r, seed=5)
             for r in range(2)]
    first = [next(iter(s)) for s in ranks]
    for s in ranks:
        s.set_epoch(0, skip=skip)
    later = [[i for _, i in zip(range(1000), iter(s))] for s in ranks]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, peak  # a few chunks of positions, not 10^9 of them
    assert len(ranks[0]) == (n - skip) // 2 and 0 <= min(first) and max(first) < n
    # The same positions on 3 ranks give the same samples: the order is global.
    three = [ResumableDistributedSampler(_Virtual(n), num_replicas=3, rank=r, seed=5)
             for r in range(3)]
    for s in three:
        s.set_epoch(0, skip=skip)
    merged = [i for row in zip(*later) for i in row]
    dealt = [[i for _, i in zip(range(700), iter(s))] for s in three]
    assert [i for row in zip(*dealt) for i in row][:2000] == merged[:2000]
    assert len(set(merged)) == len(merged)


# --- streaming ---

@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumes_where_it_stopped(tmp_path, monkeypatch, workers):
    files = _text_files(tmp_path / "d", n=6, size=20_000)
    args = [f"data.source={files}", "data.streaming=true", f"data.num_workers={workers}",
            "max_steps=12", "log_every=1", "eval_every=12", "checkpoint_every=100", *TINY]
    straight, error = train_here(LM_TINY, f"output_dir={tmp_path / 'straight'}", *args)
    assert error is None
    # The loader's workers stop with the run, not at some later garbage collection.
    assert not multiprocessing.active_children()
    monkeypatch.setenv("TRAIN_FAULT_SIGNAL", "5:0:USR1")
    _, error = train_here(LM_TINY, f"output_dir={tmp_path / 'run'}", *args)
    assert isinstance(error, StoppedBySignal) and not multiprocessing.active_children()
    monkeypatch.delenv("TRAIN_FAULT_SIGNAL")
    resumed, error = train_here(LM_TINY, f"output_dir={tmp_path / 'run'}", *args)
    assert error is None
    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 12
    assert [r["val/tokens"] for r in resumed if "val/tokens" in r] == [
        r["val/tokens"] for r in straight if "val/tokens" in r]


# --- evaluation of a big validation set ---

def test_evaluations_during_training_are_capped_and_the_last_covers_everything(tmp_path):
    files = _text_files(tmp_path / "d", n=4, size=3_000)  # ~190 validation blocks
    rows, error = train_here(LM_TINY, f"output_dir={tmp_path / 'run'}", f"data.source={files}",
                             "data.val_fraction=0.5", "data.eval_batch_size=1", "max_steps=4",
                             "eval_every=2", *TINY)
    assert error is None
    evals = [r["val/tokens"] for r in rows if "val/tokens" in r]
    assert evals[0] == 100 * 32  # AUTO_EVAL_BATCHES batches of one 32-token block
    assert evals[-1] > evals[0]
