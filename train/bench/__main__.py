"""`python -m train.bench NAME [--json] [--quick]`."""

from __future__ import annotations

import argparse
import sys

from train.bench import BENCHMARKS, COMMANDS

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.bench",
        description="Run a micro-benchmark and print its report.",
        epilog=f"benchmarks: {', '.join(sorted([*BENCHMARKS, *COMMANDS]))}")
    parser.add_argument("name", help="which benchmark: " + ", ".join(sorted(BENCHMARKS)))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes that run in seconds (for tests and smoke checks)")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # its own options
        import importlib

        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    args = parser.parse_args(argv)
    bench = BENCHMARKS.get(args.name)
    if bench is None:
        print(f"error: unknown benchmark {args.name!r}; known: "
              f"{', '.join(sorted(BENCHMARKS))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return bench(args.quick, args.json)


if __name__ == "__main__":
    sys.exit(main())
