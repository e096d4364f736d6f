"""Benchmarks: ``python -m train.bench NAME [--json] [--quick]``.

``BENCHMARKS`` maps a name to a function ``(quick: bool, as_json: bool) -> int`` (exit status)
that prints its own report. Each entry imports its module lazily, so listing names stays cheap.
``gpu`` is the GPU check (its own options: ``python -m train.bench gpu --help``);
``nanogpt`` compares with a checkout of karpathy/nanoGPT (``python -m train.bench nanogpt --help``).
"""

from __future__ import annotations

from typing import Callable


def _attention(quick: bool, as_json: bool) -> int:
    from train.bench.attention import main

    return main(quick=quick, as_json=as_json)


def _reported(module: str, run: str, show: str):
    """A benchmark whose module has `run(quick) -> dict` and `show(dict) -> str`."""

    def bench(quick: bool, as_json: bool) -> int:
        import importlib
        import json

        mod = importlib.import_module(f"train.bench.{module}")
        results = getattr(mod, run)(quick=quick)
        print(json.dumps(results) if as_json else getattr(mod, show)(results))
        return 0

    return bench


BENCHMARKS: dict[str, Callable[[bool, bool], int]] = {
    "attention": _attention,
    "trainer": _reported("trainer", "bench_trainer", "format_trainer"),
    "data": _reported("data", "bench_data", "format_data"),
    "context": _reported("context", "bench_context", "format_context"),
}
COMMANDS = {"gpu": "train.bench.gpu",  # benchmarks with options of their own
            "nanogpt": "train.bench.nanogpt"}
