"""Long context through the real trainer: `python -m train.bench context`.

The demo LM's shape (4 layers, width 256, 4 heads) on the Python standard library (byte
tokens) at several context lengths L, each with the same tokens per step (batch = tokens / L),
trained by `train.loop.train` with `chunked-causal-linear` and with softmax attention (`full`,
fast-transformers' FullAttention) in turn. Reported: each run's tokens/s (the median of its
logged windows after the first) and the ratio chunked / full at each L.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tokens_per_s(attention: str, length: int, tokens_per_step: int, steps: int,
                  quick: bool) -> float:
    from train.loop import train
    from train.tasks import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}/run", f"max_steps={steps}", f"log_every={steps // 3}",
                     f"eval_every={10**6}", "eval_max_batches=1", f"checkpoint_every={10**6}",
                     "progress_bar=false", "wandb.mode=disabled", "lm.sample_tokens=0",
                     "data.source=builtin:python_stdlib", "data.tokenizer=byte",
                     f"data.block_size={length}",
                     f"data.batch_size={max(1, tokens_per_step // length)}", "data.eval_batch_size=1",
                     f"model.attention_type={attention}",
                     "model.attention_decay=none"]  # the attention types alone differ
        if quick:
            overrides += ["model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                          "model.d_ff=64"]
        train(load_config(ROOT / "configs" / "lm_tiny.yaml", overrides))
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
        windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        return statistics.median(windows[1:] or windows)


def bench_context(quick: bool = False) -> dict:
    lengths, tokens, steps = ((64, 256), 512, 6) if quick else ((512, 2048, 8192), 8192, 9)
    rows = []
    for length in lengths:
        chunked = _tokens_per_s("chunked-causal-linear", length, tokens, steps, quick)
        full = _tokens_per_s("full", length, tokens, steps, quick)
        rows.append({"context": length, "batch": max(1, tokens // length),
                     "chunked_tokens_per_s": chunked, "full_tokens_per_s": full,
                     "ratio": chunked / full})
    return {"benchmark": "context", "tokens_per_step": tokens, "rows": rows}


def format_context(r: dict) -> str:
    lines = [f"tokens per step: {r['tokens_per_step']}",
             "context  batch  chunked tok/s  full tok/s  chunked / full"]
    for row in r["rows"]:
        lines.append(f"{row['context']:>7} {row['batch']:>6} {row['chunked_tokens_per_s']:>14.0f} "
                     f"{row['full_tokens_per_s']:>11.0f} {row['ratio']:>15.2f}")
    return "\n".join(lines)
