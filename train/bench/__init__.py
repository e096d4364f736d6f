"""Micro-benchmarks: ``python -m train.bench NAME [--json] [--quick]``.

``BENCHMARKS`` maps a name to a function ``(quick: bool, as_json: bool) -> int`` (exit status)
that prints its own report. Each entry imports its module lazily, so listing names stays cheap.
"""

from __future__ import annotations

from typing import Callable


def _attention(quick: bool, as_json: bool) -> int:
    from train.bench.attention import main

    return main(quick=quick, as_json=as_json)


def _trainer(quick: bool, as_json: bool) -> int:
    import json

    from train.bench.trainer import bench_trainer, format_trainer

    results = bench_trainer(quick=quick)
    print(json.dumps(results) if as_json else format_trainer(results))
    return 0


BENCHMARKS: dict[str, Callable[[bool, bool], int]] = {
    "attention": _attention,
    "trainer": _trainer,
}
