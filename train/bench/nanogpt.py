"""This project's language model side by side with karpathy/nanoGPT on the same bytes:
`python -m train.bench nanogpt --nanogpt-dir DIR [--out DIR] [--steps N] [--json]`.

DIR is a checkout of nanoGPT (git clone https://github.com/karpathy/nanoGPT DIR); its own
train.py trains its arm, and its model.py loads its checkpoint for scoring. Both arms see the
embedded pydoc text in byte tokens with this project's split (written to DIR/data/{DATASET}/ in
nanoGPT's format), the same shape (4 layers, width 256, 4 heads, MLP 1024) and the same
optimisation (AdamW 2e-3, warm-up 50, cosine towards 2e-4 over 2 x N steps, weight decay 0.1,
beta2 0.95, clip 1.0, batch 32), and run at the same time, one thread each, so that both see
the same machine load. Reported:

- context 128: validation bits per byte after N steps, both scored on exactly the validation
  blocks this project evaluates, the time per step and the peak memory;
- context 1024 (batch 4) and 4096 (batch 1): tokens per second and peak memory while nanoGPT
  trains LONG_STEPS steps and this project's arm trains alongside until nanoGPT has finished.

Peak memory is given twice: anonymous (what the process allocated: tensors, heap, objects) and
resident over the process's whole life, which also counts library code read in from disk.

Times are medians of each arm's own per-step times after its first WARMUP_STEPS, so that start-up,
first allocations and a step that ran while the other arm had already stopped do not count.

With --equal-time, one more pair: nanoGPT at context 1024 (batch 4, EQUAL_TIME_NANOGPT's steps)
against this project at 4096 (batch 1) for as many steps as the speeds just measured give it in
the same time, each scored on the validation bytes at its own context.

It takes 7 to 15 minutes on 2 cores at N = 200, depending on the machine's matmul rate (the
200 steps at context 128 are most of it); --equal-time adds 6 to 20.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from train.errors import EXIT_STOPPED_BY_SIGNAL

ROOT = Path(__file__).resolve().parents[2]
DATASET = "train_bench_pydoc_bytes"
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256}  # nanoGPT's MLP is 4 x n_embd = 1024
RECIPE = {"lr": 2e-3, "warmup": 50, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta2": 0.95,
          "clip": 1.0}
LONG = ((1024, 4), (4096, 1))
LONG_STEPS = 20
# The equal-time row: nanoGPT at the context it affords at this project's speed at 4096.
EQUAL_TIME_NANOGPT = (1024, 4, 240)  # context, batch, steps
WARMUP_STEPS = 5
SAMPLE_EVERY_S = 0.02  # how often each arm's anonymous memory is read


def _corpus():
    from train.data.corpus import prepare
    from train.data.tokenizer import ByteTokenizer
    from train.tasks import load_config

    cfg = load_config(ROOT / "configs" / "lm_tiny.yaml",
                      ["output_dir=unused", "data.tokenizer=byte", "data.block_size=128"]).data
    return prepare(cfg, ByteTokenizer(), show_progress=False)


def prepare_data(nanogpt_dir: Path) -> dict:
    """Write this project's train/validation tokens as nanoGPT's train.bin / val.bin."""
    corpus, tokenizer = _corpus()
    out = nanogpt_dir / "data" / DATASET
    out.mkdir(parents=True, exist_ok=True)
    for name, blocks in (("train", corpus.train), ("val", corpus.val)):
        tokens = np.fromfile(Path(blocks.store_path) / "tokens.bin", dtype=blocks.meta["dtype"])
        tokens[blocks.start:blocks.end].astype(np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": tokenizer.vocab_size}, f)
    return {"val_tokens": corpus.val_tokens, "val_bytes": corpus.val_bytes}


def score_nanogpt(nanogpt_dir: Path, checkpoint: Path, block: int, corpus: dict) -> float:
    """Bits per byte of a nanoGPT checkpoint over the validation blocks this project scores:
    consecutive blocks of `block` predicted tokens, the last one shorter."""
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt_dir / "model.py")
    model_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_py)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        model = model_py.GPT(model_py.GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    val = np.fromfile(nanogpt_dir / "data" / DATASET / "val.bin", dtype=np.uint16)
    val = torch.from_numpy(val.astype(np.int64))
    nats = count = 0
    with torch.no_grad():
        for begin in range(0, len(val) - 1, block):
            y = val[begin + 1:begin + block + 1]
            x = val[begin:begin + len(y)]
            logits, _ = model(x[None], y[None])
            nats += torch.nn.functional.cross_entropy(logits[0], y, reduction="sum").item()
            count += len(y)
    return nats / count * corpus["val_tokens"] / corpus["val_bytes"] / math.log(2)


@dataclasses.dataclass(frozen=True)
class Arm:
    """What one arm trains: `steps` steps of `batch` blocks of `block` tokens, its learning rate
    decaying over `decay` steps."""
    block: int
    batch: int
    steps: int
    decay: int


def _nanogpt_command(out: Path, block: int, batch: int, steps: int, decay: int) -> list[str]:
    r = RECIPE
    flags = {"dataset": DATASET, "device": "cpu", "compile": False, "dtype": "float32",
             "gradient_accumulation_steps": 1, "batch_size": batch, "block_size": block,
             **SHAPE, "dropout": 0.0, "bias": False, "learning_rate": r["lr"],
             "max_iters": steps, "lr_decay_iters": decay, "warmup_iters": r["warmup"],
             "min_lr": r["lr"] * r["min_lr_ratio"], "weight_decay": r["weight_decay"],
             "beta2": r["beta2"], "grad_clip": r["clip"], "eval_interval": steps,
             "eval_iters": 1, "log_interval": 1, "always_save_checkpoint": True,
             "out_dir": str(out), "wandb_log": False}
    return ["train.py", *(f"--{k}={v}" for k, v in flags.items())]


def _our_command(out: Path, block: int, batch: int, steps: int, decay: int) -> list[str]:
    r = RECIPE
    return ["-m", "train", str(ROOT / "configs" / "lm_tiny.yaml"), f"output_dir={out}",
            "data.tokenizer=byte", f"data.block_size={block}", f"data.batch_size={batch}",
            f"max_steps={steps}", f"optim.decay_steps={decay}", f"optim.lr={r['lr']}",
            f"optim.warmup_steps={r['warmup']}", f"optim.min_lr_ratio={r['min_lr_ratio']}",
            f"optim.weight_decay={r['weight_decay']}", f"optim.beta2={r['beta2']}",
            f"optim.grad_clip={r['clip']}", f"eval_every={steps}", "eval_max_batches=null",
            f"checkpoint_every={steps}", "log_every=1", "wandb.mode=disabled",
            "progress_bar=false", "lm.sample_tokens=0",
            # nanoGPT evaluates in its training batch too: both peaks are the training's.
            f"data.eval_batch_size={batch}"]


def _run_pair(nanogpt_dir: Path, out: Path, nanogpt: Arm, ours: Arm,
              ours_until_nanogpt_ends: bool = False) -> dict:
    """Both arms at once, one thread each: their step times, peak memory and exit status.

    With ours_until_nanogpt_ends, this project's arm keeps training until nanoGPT's has run
    its steps and is then stopped (SIGTERM), so that neither arm runs alone: the faster one
    would otherwise finish early and leave the other the whole machine.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if ours_until_nanogpt_ends:
        ours = dataclasses.replace(ours, steps=100 * nanogpt.steps)
    arms = {"nanogpt": (_nanogpt_command(out / "nanogpt", *dataclasses.astuple(nanogpt)),
                        nanogpt_dir),
            "ours": (_our_command(out / "ours", *dataclasses.astuple(ours)), ROOT)}
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, (command, cwd) in arms.items():
            log = stack.enter_context(open(out / f"{name}.log", "w"))
            procs[name] = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
        ended = _watch(procs, stop_ours_when_nanogpt_ends=ours_until_nanogpt_ends)
    expected = {"nanogpt": 0, "ours": EXIT_STOPPED_BY_SIGNAL if ours_until_nanogpt_ends else 0}
    for name, (code, _, _) in ended.items():
        if code != expected[name]:
            block = {"nanogpt": nanogpt.block, "ours": ours.block}[name]
            raise RuntimeError(f"{name} at context {block} exited {code}; see {out / name}.log")
    nanogpt_times = [float(t) / 1000 for i, t in re.findall(
        r"iter (\d+): loss \S+, time ([\d.]+)ms", (out / "nanogpt.log").read_text())
        if 0 < int(i) < nanogpt.steps]  # the last one also evaluates and saves
    rows = [json.loads(line) for line in (out / "ours" / "metrics.jsonl").open()]
    our_times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    row = {"context": nanogpt.block, "batch": nanogpt.batch, "steps": nanogpt.steps,
           "ours_steps": rows[-1]["step"],
           "nanogpt_s_per_step": statistics.median(nanogpt_times[WARMUP_STEPS:]),
           "ours_s_per_step": statistics.median(our_times[WARMUP_STEPS:]),
           "nanogpt_train_s": sum(nanogpt_times), "ours_train_s": sum(our_times),
           "nanogpt_peak_mib": ended["nanogpt"][1], "ours_peak_mib": ended["ours"][1],
           "nanogpt_peak_anon_mib": ended["nanogpt"][2], "ours_peak_anon_mib": ended["ours"][2]}
    if not ours_until_nanogpt_ends:
        row["ours_val_bpb"] = [r for r in rows if "val/bpb" in r][-1]["val/bpb"]
    return row


def _watch(procs: dict[str, subprocess.Popen], stop_ours_when_nanogpt_ends: bool) -> dict:
    """Wait for both arms; name -> (exit code, peak resident MiB, peak anonymous MiB).

    Resident memory is the kernel's figure for the whole process life (ru_maxrss), which
    includes the library code that tearing torch down at exit reads in (~100 MiB of file
    pages for either arm); anonymous memory (tensors, heap, the interpreter's objects) is what
    training itself allocates, read from /proc every SAMPLE_EVERY_S.
    """
    anon = dict.fromkeys(procs, 0.0)
    ended = {}
    stopping = False
    try:
        while len(ended) < len(procs):
            for name, proc in procs.items():
                if name in ended:
                    continue
                anon[name] = max(anon[name], _anonymous_mib(proc.pid))
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    ended[name] = (proc.returncode, usage.ru_maxrss / 1024, anon[name])
            if "nanogpt" in ended and "ours" not in ended and not stopping and (
                    stop_ours_when_nanogpt_ends or ended["nanogpt"][0]):
                procs["ours"].terminate()  # once: it saves a checkpoint, then exits
                stopping = True
            time.sleep(SAMPLE_EVERY_S)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    return ended


def _anonymous_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # it has just exited
        pass
    return 0.0


def bench_nanogpt(nanogpt_dir: Path, out: Path, steps: int, equal_time: bool = False) -> dict:
    corpus = prepare_data(nanogpt_dir)
    short_arm = Arm(128, 32, steps, 2 * steps)
    short = _run_pair(nanogpt_dir, out / "context_128", short_arm, short_arm)
    short["nanogpt_val_bpb"] = score_nanogpt(nanogpt_dir, out / "context_128" / "nanogpt" /
                                             "ckpt.pt", 128, corpus)
    rows = [short]
    for block, batch in LONG:
        arm = Arm(block, batch, LONG_STEPS, 2 * steps)
        rows.append(_run_pair(nanogpt_dir, out / f"context_{block}", arm, arm,
                              ours_until_nanogpt_ends=True))
    for row in rows:
        tokens = row["context"] * row["batch"]
        row["nanogpt_tokens_per_s"] = tokens / row["nanogpt_s_per_step"]
        row["ours_tokens_per_s"] = tokens / row["ours_s_per_step"]
    results = {"benchmark": "nanogpt", "steps": steps, "rows": rows}
    if equal_time:
        results["equal_time"] = _equal_time(nanogpt_dir, out / "equal_time", corpus, rows)
    return results


def equal_time_arms(rows: list[dict]) -> tuple[Arm, Arm]:
    """nanoGPT at 1024 tokens of context and this project at 4096 for the same time: the same
    tokens per step, this project's steps scaled by the two speeds measured in `rows`, each
    arm's learning rate decaying over its own steps."""
    block, batch, steps = EQUAL_TIME_NANOGPT
    speed = {row["context"]: row for row in rows}
    ours_block = LONG[-1][0]
    ours_steps = round(steps * speed[ours_block]["ours_tokens_per_s"]
                       / speed[block]["nanogpt_tokens_per_s"])
    return (Arm(block, batch, steps, steps),
            Arm(ours_block, block * batch // ours_block, ours_steps, ours_steps))


def _equal_time(nanogpt_dir: Path, out: Path, corpus: dict, rows: list[dict]) -> dict:
    nanogpt, ours = equal_time_arms(rows)
    row = _run_pair(nanogpt_dir, out, nanogpt, ours)
    return {"nanogpt_context": nanogpt.block, "nanogpt_batch": nanogpt.batch,
            "nanogpt_steps": nanogpt.steps, "nanogpt_train_s": row["nanogpt_train_s"],
            "nanogpt_val_bpb": score_nanogpt(nanogpt_dir, out / "nanogpt" / "ckpt.pt",
                                             nanogpt.block, corpus),
            "ours_context": ours.block, "ours_batch": ours.batch, "ours_steps": ours.steps,
            "ours_train_s": row["ours_train_s"], "ours_val_bpb": row["ours_val_bpb"]}


def format_nanogpt(r: dict) -> str:
    short = r["rows"][0]
    lines = ["| context | figure | nanoGPT | this project |", "|---|---|---|---|",
             f"| 128 | val bits/byte at step {r['steps']} | {short['nanogpt_val_bpb']:.3f} | "
             f"{short['ours_val_bpb']:.3f} |",
             f"| 128 | seconds per step | {short['nanogpt_s_per_step']:.2f} | "
             f"{short['ours_s_per_step']:.2f} "
             f"({short['ours_s_per_step'] / short['nanogpt_s_per_step']:.2f}x) |"]
    for row in r["rows"]:
        if row["context"] != 128:
            lines.append(f"| {row['context']} (batch {row['batch']}) | tokens/s | "
                         f"{row['nanogpt_tokens_per_s']:.0f} | {row['ours_tokens_per_s']:.0f} "
                         f"({row['ours_tokens_per_s'] / row['nanogpt_tokens_per_s']:.2f}x) |")
    for row in r["rows"]:
        lines.append(f"| {row['context']} | peak memory, anonymous / resident | "
                     f"{row['nanogpt_peak_anon_mib']:.0f} / {row['nanogpt_peak_mib']:.0f} MiB | "
                     f"{row['ours_peak_anon_mib']:.0f} / {row['ours_peak_mib']:.0f} MiB |")
    if "equal_time" in r:
        e = r["equal_time"]
        lines.append(f"| equal time | val bits/byte, nanoGPT at {e['nanogpt_context']} (batch "
                     f"{e['nanogpt_batch']}) vs this project at {e['ours_context']} (batch "
                     f"{e['ours_batch']}) | {e['nanogpt_val_bpb']:.3f} ({e['nanogpt_steps']} "
                     f"steps, {e['nanogpt_train_s']:.0f} s) | {e['ours_val_bpb']:.3f} "
                     f"({e['ours_steps']} steps, {e['ours_train_s']:.0f} s) |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench nanogpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt-dir", type=Path, required=True,
                        help="a checkout of https://github.com/karpathy/nanoGPT")
    parser.add_argument("--out", type=Path, default=None,
                        help="where both arms' runs go (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps at context 128, of a schedule twice as long")
    parser.add_argument("--equal-time", action="store_true",
                        help="also train nanoGPT at context 1024 and this project at 4096 for "
                             "the same time and compare their scores (8-20 min more)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not all((args.nanogpt_dir / name).is_file() for name in ("train.py", "model.py")):
        print(f"error: --nanogpt-dir {args.nanogpt_dir} is not a nanoGPT checkout (no train.py "
              "and model.py); git clone https://github.com/karpathy/nanoGPT there",
              file=sys.stderr)
        return 2
    if args.steps < 20:
        print("error: --steps must be at least 20 (the first 10 are not timed)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            results = bench_nanogpt(args.nanogpt_dir.resolve(),
                                    (args.out or Path(tmp)).resolve(), args.steps,
                                    args.equal_time)
        except RuntimeError as exc:  # an arm failed: its log says why
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(results) if args.json else format_nanogpt(results))
    return 0
