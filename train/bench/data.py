"""What the language-model data path costs on a real corpus: `python -m train.bench data`.

The corpus is assembled here from the Python source files on this machine (the standard
library first, with its files that are not UTF-8, then installed packages; from the start
again if they are too few) until it reaches the asked size, copied into the bench folder once. Then, in this process:

* the physical floor: copying the corpus's files to the same disk (read every byte, write it),
  after one untimed read so that both it and the ingest read from the page cache;
* ingest with the byte tokenizer and with a trained BPE (training timed apart), as MB of
  text per second and as a fraction of the copy rate;
* disk: what the token store adds, in bytes per token;
and in fresh subprocesses:
* peak RSS (VmHWM) of the ingest and of a short training run, at two corpus sizes;
* seconds from `python -m train` starting to the end of a 1-step run on the warm cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python_sources() -> list[Path]:
    """This machine's Python source files: the standard library, then site-packages."""
    from train.data.sources import python_stdlib_files

    seen = set(python_stdlib_files())
    files = sorted(seen)
    for root in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for path in sorted(Path(root).rglob("*.py")):
            if path not in seen and path.is_file():
                seen.add(path)
                files.append(path)
    return files


def assemble_corpus(folder: Path, megabytes: int) -> Path:
    """A folder of copied Python files of at least `megabytes` MB (made once)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total, want, sources = 0, megabytes * 1_000_000, python_sources()
    for i in range(10 * len(sources)):  # again from the start if the machine has too few
        if total >= want:
            break
        path = sources[i % len(sources)]
        shutil.copyfile(path, folder / f"{i:07d}_{path.name}")
        total += path.stat().st_size
    done.write_text(str(total))
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def copy_rate(folder: Path, scratch: Path, repeats: int = 3) -> float:
    """Bytes per second of copying every file of `folder` to `scratch` (same disk): the best
    of `repeats` copies, since the floor is what the disk can do when nothing is in its way."""
    files = _files(folder)
    for path in files:  # untimed read: the page cache holds the corpus for both arms
        path.read_bytes()
    total, best = sum(p.stat().st_size for p in files), float("inf")
    for _ in range(repeats):
        scratch.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for path in files:
            with open(path, "rb") as src, open(scratch / path.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        best = min(best, time.perf_counter() - start)
        shutil.rmtree(scratch, ignore_errors=True)
    return total / best


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ingest(folder: Path, tokenizer, cache: Path) -> dict:
    from train.data.sources import open_source
    from train.data.token_store import open_store

    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    store = open_store(open_source(str(folder)), "all", tokenizer, str(cache), show_progress=False)
    seconds = time.perf_counter() - start
    meta = store.meta
    return {"mb_per_s": meta["bytes"] / seconds / 1e6, "seconds": seconds,
            "text_mb": meta["bytes"] / 1e6, "tokens": meta["tokens"],
            "bytes_per_token_on_disk": _store_bytes(cache) / meta["tokens"],
            "text_bytes_per_token": meta["bytes"] / meta["tokens"],
            "replaced_bytes": meta["replaced_bytes"]}


_RSS_SCRIPT = """
import json, sys
from train.data.sources import open_source
from train.data.token_store import open_store
from train.data.tokenizer import ByteTokenizer
from train.metrics import peak_rss_mb
open_store(open_source(sys.argv[1]), "all", ByteTokenizer(), sys.argv[2], show_progress=False)
print(json.dumps(peak_rss_mb()))
"""


def _child_env(cache: Path) -> dict:
    env = dict(os.environ, TRAIN_CACHE=str(cache), WANDB_MODE="disabled")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def peak_rss(folder: Path, cache: Path, steps: int) -> dict:
    """Peak RSS (MiB) of a fresh process building the store, then of one training on it."""
    shutil.rmtree(cache, ignore_errors=True)
    env = _child_env(cache)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(folder), str(cache)], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)
    ingest_mb = json.loads(out.stdout.strip().splitlines()[-1])
    run = cache / "run"
    subprocess.run([sys.executable, "-m", "train", str(ROOT / "configs" / "lm_tiny.yaml"),
                    f"output_dir={run}", f"data.source={folder}", "data.tokenizer=byte",
                    f"max_steps={steps}", f"log_every={steps}", "eval_max_batches=2",
                    "progress_bar=false",
                    "wandb.mode=disabled", "lm.sample_tokens=0", f"checkpoint_every={10**6}"],
                   env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"ingest_peak_rss_mb": ingest_mb,
            "train_peak_rss_mb": max(r.get("peak_mem_mb", 0) for r in rows)}


def warm_start_seconds(folder: Path, cache: Path) -> float:
    """Wall time of `python -m train` for one step on a corpus whose store is cached."""
    env = _child_env(cache)
    args = [sys.executable, "-m", "train", str(ROOT / "configs" / "lm_tiny.yaml"),
            f"data.source={folder}", "data.tokenizer=byte", "max_steps=1", "eval_max_batches=1",
            "progress_bar=false", "wandb.mode=disabled", "lm.sample_tokens=0", "resume=never"]
    subprocess.run([*args, f"output_dir={cache / 'warm-up'}"], env=env, check=True,
                   capture_output=True, cwd=ROOT)  # builds the store if it is not there
    start = time.perf_counter()
    subprocess.run([*args, f"output_dir={cache / 'timed'}"], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def bench_data(quick: bool = False, folder: Path | None = None) -> dict:
    from train.data.tokenizer import ByteTokenizer, train_bpe
    from train.data.sources import open_source, segments

    size, small, large = (8, 4, 16) if quick else (120, 30, 300)
    base = Path(os.environ.get("TRAIN_CACHE") or Path.home() / ".cache" / "train") / "bench"
    corpus = folder or assemble_corpus(base / f"corpus-{size}mb", size)
    with tempfile.TemporaryDirectory(dir=base if base.is_dir() else None) as tmp:
        tmp = Path(tmp)
        floor = copy_rate(corpus, tmp / "copy")
        byte = ingest(corpus, ByteTokenizer(), tmp / "byte")
        start = time.perf_counter()
        sample = (segment.decode("utf-8", "replace") for document in
                  open_source(str(corpus)).splits["all"] for segment in segments(document.read()))
        bpe_tokenizer = train_bpe(_first_bytes(sample, 64 << 20), 4096, tmp / "bpe.json")
        bpe_train_s = time.perf_counter() - start
        bpe = ingest(corpus, bpe_tokenizer, tmp / "bpe")
        byte["vs_copy"], bpe["vs_copy"] = (r["mb_per_s"] * 1e6 / floor for r in (byte, bpe))
        rss = {f"{mb}mb": peak_rss(assemble_corpus(base / f"corpus-{mb}mb", mb), tmp / f"rss{mb}",
                                   steps=20) for mb in (small, large)}
        warm = warm_start_seconds(corpus, tmp / "warm")
    return {"benchmark": "data", "corpus_mb": byte["text_mb"], "copy_mb_per_s": floor / 1e6,
            "byte": byte, "bpe_4096": {**bpe, "train_seconds_64mb_sample": bpe_train_s},
            "peak_rss": rss, "warm_cache_one_step_run_s": warm, "cpus": os.cpu_count(),
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "true")}


def _first_bytes(texts, limit: int):
    taken = 0
    for text in texts:
        yield text
        taken += len(text)
        if taken >= limit:
            return


def format_data(r: dict) -> str:
    b, p = r["byte"], r["bpe_4096"]
    lines = [f"corpus: {r['corpus_mb']:.0f} MB of Python sources ({b['replaced_bytes']} bytes "
             f"not UTF-8 under BPE: {p['replaced_bytes']})",
             f"copy floor (read + write, same disk): {r['copy_mb_per_s']:.0f} MB/s",
             "tokenizer  MB/s   vs copy   bytes/token on disk   text bytes/token",
             f"byte       {b['mb_per_s']:6.0f}  {b['vs_copy']:7.2f}   "
             f"{b['bytes_per_token_on_disk']:19.3f}   {b['text_bytes_per_token']:.2f}",
             f"bpe:4096   {p['mb_per_s']:6.1f}  {p['vs_copy']:7.3f}   "
             f"{p['bytes_per_token_on_disk']:19.3f}   {p['text_bytes_per_token']:.2f}"
             f"   (training the BPE: {p['train_seconds_64mb_sample']:.1f} s)"]
    for name, v in r["peak_rss"].items():
        lines.append(f"peak RSS, {name} corpus: ingest {v['ingest_peak_rss_mb']:.0f} MiB, "
                     f"training {v['train_peak_rss_mb']:.0f} MiB")
    lines.append(f"warm cache: a 1-step `python -m train` run takes "
                 f"{r['warm_cache_one_step_run_s']:.1f} s from start to exit")
    return "\n".join(lines)
