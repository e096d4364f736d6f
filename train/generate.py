"""Sample from a trained sequence model with its recurrent (O(1) per token) twin.

    python -m train.generate RUN_DIR --prompt TEXT --max-new-tokens N \
        [--temperature T] [--top-k K] [--seed S] [--num-samples B]      (language models)
    python -m train.generate RUN_DIR --source TEXT [--source TEXT ...] \
        [--temperature T] [--top-k K] [--seed S] [--num-samples B]      (seq2seq)

A seq2seq run prints one `source<TAB>output` line per source (and sample); its decoding is
greedy unless --temperature is given. Loads RUN_DIR's latest checkpoint on CPU, whatever device
trained it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

EXIT_BAD_INPUT = 2


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None,
           context: int | None = None) -> list[str]:
    """Continue each prompt by `max_new_tokens` tokens, all prompts in one batch.

    Every row steps through positions 0, 1, 2, ...: while a row is still inside its prompt the
    prompt token is fed, afterwards the sampled one. Returns the continuations only.

    `context` is the sequence length the model was trained on. It never saw later positions, so
    when the state reaches it, sampling restarts from a fresh state primed with the last
    context/2 tokens (about twice the cost per token, and text that stays coherent).
    """
    from train.models.sequence import pick_tokens

    stepper = model.recurrent()
    device = next(stepper.parameters()).device
    newline = tokenizer.encode("\n")
    rows = [tokenizer.encode(p) or newline for p in prompts]  # empty prompt: start at a newline
    lengths = [len(r) for r in rows]
    total = max(lengths) + max_new_tokens
    tokens = torch.zeros(len(rows), total, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    in_prompt = torch.arange(total).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)

    state, start = None, 0  # start: the absolute position the current state began at
    for pos in range(total - 1):
        if context and pos - start >= context:
            start, state = pos - context // 2, None
            for p in range(start, pos):
                _, state = stepper.step(tokens[:, p].to(device), p - start, state)
        logits, state = stepper.step(tokens[:, pos].to(device), pos - start, state)
        nxt = pick_tokens(logits, temperature, top_k, generator).cpu()
        tokens[:, pos + 1] = torch.where(in_prompt[:, pos + 1], tokens[:, pos + 1], nxt)
    return [tokenizer.decode(tokens[i, n: n + max_new_tokens].tolist())
            for i, n in enumerate(lengths)]


def load_run(run_dir: Path):
    """(task, model on CPU with the latest checkpoint's weights) for a run directory."""
    from train import checkpoint
    from train.config import ConfigError, load
    from train.tasks import build_task

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); "
                          "pass the output_dir of a training run")
    config = load(run_dir / "config.yaml")
    latest = checkpoint.latest_verified(run_dir)
    if latest is None:
        raise ConfigError(f"{run_dir} has no complete, intact checkpoint under checkpoints/")
    task = build_task(config)
    if config.task not in ("lm", "seq2seq"):
        raise ConfigError(f"{run_dir} trained a {config.task!r} model; generation needs a "
                          "language model or a seq2seq model")
    model = task.model()
    model.load_state_dict(checkpoint.load_model_weights(latest), strict=True)
    return task, model.eval(), latest


def main(argv: list[str] | None = None) -> int:
    from train.config import ConfigError

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
    args = parser.parse_args(argv)
    if (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.top_k < 0 \
            or args.num_samples < 1 or (args.temperature is not None and args.temperature <= 0):
        parser.error("need --max-new-tokens >= 1, --temperature > 0, --top-k >= 0, "
                     "--num-samples >= 1")
    try:
        task, model, latest = load_run(args.run_dir)
        if task.config.task == "seq2seq" and (not args.source or not all(args.source)):
            raise ConfigError("a seq2seq run decodes source texts: pass --source TEXT "
                              "(non-empty, repeatable)")
        if task.config.task != "seq2seq" and args.source:
            raise ConfigError("--source is for seq2seq runs; continue a text with --prompt")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    generator = torch.Generator().manual_seed(args.seed)
    if task.config.task == "seq2seq":
        from train.tasks.seq2seq import decode_texts

        sources = [s for s in args.source for _ in range(args.num_samples)]
        try:
            outputs = decode_texts(task, model, sources,
                                   args.max_new_tokens or task.config.data.max_target_length,
                                   args.temperature or 0.0, args.top_k, generator)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"# {latest}", file=sys.stderr)
        for source, output in zip(sources, outputs):
            print(f"{source}\t{output}")
        return 0
    texts = sample(model, task.tokenizer, [args.prompt] * args.num_samples,
                   args.max_new_tokens or 200, args.temperature or 1.0, args.top_k, generator,
                   task.context_length)
    print(f"# {latest}", file=sys.stderr)
    for text in texts:
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
