"""Sample from a trained sequence model with its recurrent (O(1) per token) twin.

    python -m train.generate RUN_DIR --prompt TEXT --max-new-tokens N \
        [--temperature T] [--top-k K] [--seed S] [--num-samples B]      (language models)
    python -m train.generate RUN_DIR --source TEXT [--source TEXT ...] \
        [--temperature T] [--top-k K] [--seed S] [--num-samples B]      (seq2seq)

--ema samples with the moving average of the weights (runs trained with ema.decay > 0).

A seq2seq run prints one `source<TAB>output` line per source (and sample); its decoding is
greedy unless --temperature is given. Loads RUN_DIR's latest checkpoint on CPU, whatever device
trained it. Which runs can generate, and from what input, is the task's to say (train.tasks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from train.errors import ConfigError, TrainError


def load_run(run_dir: Path, ema: bool = False, checkpoint_dir: Path | None = None):
    """(task, model on CPU with the weights of the latest intact checkpoint or of
    `checkpoint_dir`, or their moving average with `ema`, checkpoint) of a run directory."""
    from train import checkpoint
    from train.tasks import build_task, load_run_config, task_spec

    config = load_run_config(run_dir)  # its files (e.g. the tokenizer) are read from run_dir
    if not task_spec(config.task).generates:
        raise ConfigError(f"{run_dir} trained a {config.task!r} model, which does not generate; "
                          "generation needs a language model or a seq2seq model")
    latest = checkpoint.chosen_checkpoint(run_dir, checkpoint_dir)
    task = build_task(config)
    model = task.model()
    weights = (checkpoint.load_ema_weights(latest) if ema else
               checkpoint.load_model_weights(latest, model))
    model.load_state_dict(weights, strict=True)
    return task, model.eval(), latest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default="", help="language models: the text to continue")
    parser.add_argument("--source", action="append", default=[],
                        help="seq2seq: a source text to decode (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 200 (LM), data.max_target_length (seq2seq)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: 1.0 (LM), greedy (seq2seq)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--ema", action="store_true",
                        help="use the moving average of the weights (ema.decay > 0)")
    args = parser.parse_args(argv)
    if (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.top_k < 0 \
            or args.num_samples < 1 or (args.temperature is not None and args.temperature <= 0):
        parser.error("need --max-new-tokens >= 1, --temperature > 0, --top-k >= 0, "
                     "--num-samples >= 1")
    try:
        task, model, latest = load_run(args.run_dir, args.ema)
        if task.generate_input == "source":
            if not args.source or not all(args.source):
                raise ConfigError("a seq2seq run decodes source texts: pass --source TEXT "
                                  "(non-empty, repeatable)")
            inputs = args.source
        else:
            if args.source:
                raise ConfigError("--source is for seq2seq runs; continue a text with --prompt")
            inputs = [args.prompt]
        inputs = [text for text in inputs for _ in range(args.num_samples)]
        outputs = task.generate(model, inputs, args.max_new_tokens, args.temperature,
                                args.top_k, torch.Generator().manual_seed(args.seed))
    except TrainError as exc:
        print(f"{exc.prefix}{exc}", file=sys.stderr)
        return exc.exit_code
    print(f"# {latest}", file=sys.stderr)
    for text, output in zip(inputs, outputs):
        print(f"{text}\t{output}" if task.generate_input == "source" else text + output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
