"""`python -m train CONFIG.yaml [dotted.key=value ...]` (also under accelerate launch / torchrun)."""

from __future__ import annotations

import argparse
import sys

from train.config import ConfigError, load
from train.signals import EXIT_STOPPED_BY_SIGNAL

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a model described by a YAML config; overrides use dotted keys.",
        epilog="example: python -m train configs/lm_tiny.yaml max_steps=100 optim.lr=1e-3")
    parser.add_argument("config", help="YAML config file, e.g. configs/lm_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. data.batch_size=16")
    args = parser.parse_args(argv)
    try:
        config = load(args.config, args.overrides)
        from train.loop import Diverged, StoppedBySignal, train  # heavy imports after validation

        train(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoppedBySignal as exc:
        print(f"{exc}; a checkpoint was saved, run the same command to resume", file=sys.stderr)
        return EXIT_STOPPED_BY_SIGNAL
    except Diverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
