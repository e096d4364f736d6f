"""`python -m train CONFIG.yaml [dotted.key=value ...]` (also under accelerate launch / torchrun)."""

from __future__ import annotations

import argparse
import sys

from train.errors import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", allow_abbrev=False,  # --key=value flags are overrides
        description="Train a model described by a YAML config; overrides use dotted keys.",
        epilog="example: python -m train configs/lm_tiny.yaml max_steps=100 optim.lr=1e-3 "
               "(--optim.lr=1e-3, as a W&B sweep agent writes it, is the same override)")
    parser.add_argument("config", help="YAML config file, e.g. configs/lm_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. data.batch_size=16")
    args, flags = parser.parse_known_args(argv)
    unknown = [f for f in flags if not (f.startswith("--") and "=" in f)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are key=value "
                     "or --key=value)")
    args.overrides += flags
    try:
        from train.tasks import load_config

        config = load_config(args.config, args.overrides)
        from train.loop import train  # heavy imports after validation

        train(config)
    except Exception as exc:  # noqa: BLE001 - every failure ends here, told as what it is
        return exit_status(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
