"""`python -m train CONFIG.yaml [dotted.key=value ...]` (also under accelerate launch / torchrun)."""

from __future__ import annotations

import argparse
import sys
import traceback

from train.errors import EXIT_BUG, as_user_error


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
    except Exception as exc:  # noqa: BLE001 - every failure ends here, told as what it is
        error = as_user_error(exc)
        if error is None:
            traceback.print_exc()
            print("error: this is a bug in train (the traceback above says where); please "
                  "report it", file=sys.stderr)
            return EXIT_BUG
        if not error.quiet:
            print(f"{error.prefix}{error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
