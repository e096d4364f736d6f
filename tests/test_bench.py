"""`python -m train.bench`: the attention benchmark's JSON report, and the CLI's errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_report() -> dict:
    proc = _bench("attention", "--quick", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_attention_json_has_every_kernel_and_sane_values(quick_report):
    r = quick_report
    assert r["benchmark"] == "attention" and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["matmul_gflops"] > 0
    assert [row["L"] for row in r["parallel"]] == list(r["settings"]["lengths"])
    for row in r["parallel"]:
        for kernel in ("library", "chunked", "sdpa"):
            m = row[kernel]
            assert m["ms"] > 0 and m["gflops"] > 0 and m["peak_mb"] > 0, (kernel, m)
            assert m["frac_of_matmul"] == pytest.approx(m["gflops"] / r["matmul_gflops"])
        # The project's kernel computes what the library computes (fp32, grads included).
        assert 0 <= row["rel_err_vs_library"] <= 1e-5
        assert row["speedup_vs_library"] == pytest.approx(row["library"]["ms"] /
                                                          row["chunked"]["ms"])


def test_attention_json_has_recurrent_steps(quick_report):
    rows = quick_report["recurrent"]
    assert [row["position"] for row in rows] == list(quick_report["settings"]["positions"])
    assert all(row["linear_ms"] > 0 and row["full_ms"] > 0 for row in rows)
    growth = quick_report["recurrent_growth"]
    assert growth["linear"] == pytest.approx(rows[-1]["linear_ms"] / rows[0]["linear_ms"])


def test_attention_json_has_both_linear_kernels_idle_and_on_shared_cores(quick_report):
    import os

    row = quick_report["shared_cores"]
    assert row["L"] == quick_report["settings"]["shared_len"]
    assert row["busy_processes"] == (quick_report["settings"]["busy_per_core"]
                                     * len(os.sched_getaffinity(0)))
    for kernel in ("chunked", "chunked_all_threads", "library"):
        m = row[kernel]
        assert m["idle_ms"] > 0 and m["shared_ms"] > 0
        assert m["slowdown"] == pytest.approx(m["shared_ms"] / m["idle_ms"])


def test_text_report_lists_every_length(quick_report):
    from train.bench.attention import format_report

    text = format_report(quick_report)
    assert "matmul rate" in text and "speedup" in text and "recurrent sampling" in text
    assert "shared cores" in text
    for row in quick_report["parallel"]:
        assert any(line.strip().startswith(str(row["L"]) + " |") for line in text.splitlines())


def test_skipped_library_is_reported_not_measured():
    from train.bench.attention import QUICK, parallel_row

    settings = dataclasses.replace(QUICK, lengths=(32,), library_max_len=16, repeats=1)
    row = parallel_row(settings, 32, torch.device("cpu"), torch.float32, rate=1.0)
    assert row["library"] is None and row["speedup_vs_library"] is None
    assert "skipped above L=16" in row["library_skipped"]
    assert row["chunked"]["ms"] > 0 and row["sdpa"]["ms"] > 0


def test_unknown_benchmark_exits_2_with_the_known_names():
    proc = _bench("no-such-bench")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bench" in lines[0] and "attention" in lines[0]


def test_context_bench_runs_both_attentions_through_the_trainer():
    from train.bench.context import bench_context, format_context

    r = bench_context(quick=True)
    assert [row["context"] for row in r["rows"]] == [64, 256]
    for row in r["rows"]:
        assert row["chunked_tokens_per_s"] > 0 and row["full_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["chunked_tokens_per_s"] / row["full_tokens_per_s"])
    assert "chunked / full" in format_context(r)


def test_data_bench_measures_ingest_against_the_copy_floor(tmp_path):
    from train.bench.data import assemble_corpus, copy_rate, ingest
    from train.data.tokenizer import ByteTokenizer

    corpus = assemble_corpus(tmp_path / "corpus", 2)
    assert sum(p.stat().st_size for p in corpus.iterdir() if p.suffix == ".py") >= 2_000_000
    assert copy_rate(corpus, tmp_path / "copy") > 0 and not (tmp_path / "copy").exists()
    byte = ingest(corpus, ByteTokenizer(), tmp_path / "cache")
    assert byte["mb_per_s"] > 0 and byte["text_mb"] >= 2
    assert 2.0 <= byte["bytes_per_token_on_disk"] <= 2.1


def test_nanogpt_bench_needs_a_checkout_and_writes_its_data_from_our_split(tmp_path, capsys):
    """The nanoGPT side by side (it runs nanoGPT itself, so not here): a missing checkout is
    bad input; the data it hands nanoGPT are this project's own train/validation tokens."""
    import pickle

    import numpy as np

    from train.bench.nanogpt import DATASET, _corpus, main, prepare_data

    assert main(["--nanogpt-dir", str(tmp_path)]) == 2
    assert "not a nanoGPT checkout" in capsys.readouterr().err
    info = prepare_data(tmp_path)
    data = tmp_path / "data" / DATASET
    corpus, _ = _corpus()
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert len(val) == info["val_tokens"] == corpus.val.end - corpus.val.start
    first = corpus.val[0]  # the first block this project scores: the same tokens
    assert val[:128].tolist() == first["input_ids"].tolist()
    assert val[1:129].tolist() == first["labels"].tolist()
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert len(train) == corpus.train.end - corpus.train.start
    assert pickle.loads((data / "meta.pkl").read_bytes()) == {"vocab_size": 259}


def test_nanogpt_equal_time_row_gives_each_arm_the_same_time_and_tokens_per_step():
    """nanoGPT affords 1024 tokens of context in the time this project trains at 4096: the
    steps follow the two measured speeds, the batch keeps the tokens per step equal, and each
    learning rate decays over its own arm's steps."""
    from train.bench.nanogpt import equal_time_arms

    rows = [{"context": 128}, {"context": 1024, "nanogpt_tokens_per_s": 2000.0},
            {"context": 4096, "ours_tokens_per_s": 2600.0}]
    nanogpt, ours = equal_time_arms(rows)
    assert (nanogpt.block, ours.block) == (1024, 4096)
    assert nanogpt.block * nanogpt.batch == ours.block * ours.batch
    assert ours.steps == round(nanogpt.steps * 1.3)
    assert (nanogpt.decay, ours.decay) == (nanogpt.steps, ours.steps)
