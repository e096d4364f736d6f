"""`python -m train CONFIG.yaml [dotted.key=value ...]` (also under accelerate launch / torchrun)."""

from __future__ import annotations

import argparse
import sys

from train.errors import TrainError


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
        from train.tasks import load_config

        config = load_config(args.config, args.overrides)
        from train.loop import train  # heavy imports after validation

        train(config)
    except TrainError as exc:
        if not exc.quiet:
            print(f"{exc.prefix}{exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
