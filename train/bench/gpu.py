"""Every GPU check in one command: `python -m train.bench gpu` (what launch/gpu_check.sh runs).

    python -m train.bench gpu [--out DIR]            on one CUDA GPU, full sizes
    python -m train.bench gpu --cpu --quick          every part that runs on a CPU, tiny sizes

Each check is the product's own path (the trainer, the project's configs and launch files,
`train.generate`) and says pass, fail or skipped (with why); its figures go to
DIR/gpu_report.json and a table to DIR/gpu_report.md. The exit status is 0 only if no check
failed.

 1 environment  GPU, memory, CUDA, torch, NCCL, driver; the datasheet peak the MFU uses
 2 lm_bf16      a 1024-wide, 12-layer LM at context 2048 in bf16 through the trainer:
                tokens/s, MFU, peak memory, and host syncs per step (the goal: 0)
 3 fp16         the same under fp16: finite losses, grad-scaler skips counted, the LR schedule
                a function of the step alone; then a forced overflow is skipped and counted
 4 attention    chunked-causal-linear vs causal SDPA vs the library's causal-linear kernel (if
                built) vs flash-linear-attention (if installed): fwd+bwd ms, peak memory and
                error against fp32, L = 1k ... 64k in bf16
 5 vision       resnet50, bf16, channels_last, 224 px synthetic images: images/s and MFU,
                without and with compile: true
 6 fsdp         launch/accelerate/fsdp_transformer.yaml: trains, saves, resumes, and
                train.generate reads the sharded checkpoint
 7 resume       stopped by SIGUSR1 and resumed: losses against the straight run (bitwise
                under deterministic: true, else the largest difference)
 8 gpu_to_cpu   the GPU run's checkpoint samples on the CPU (train.generate, no GPU visible)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
VISION_TINY = ROOT / "configs" / "vision_tiny.yaml"
QUIET = ["progress_bar=false", "wandb.mode=disabled"]


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    quick: bool
    out: Path  # the reports; the runs of each check go under out/runs/CHECK

    def runs(self, check: str) -> Path:
        return self.out / "runs" / check

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


class Skipped(Exception):
    """A check (or a part of one) that cannot run here; the message says why."""


def _train(config: Path, out: Path, overrides: list[str], env: dict | None = None) -> list[dict]:
    """A run through the trainer in this process; its metrics rows."""
    from train.loop import train
    from train.tasks import load_config

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    quiet = [*QUIET, "lm.sample_tokens=0"] if config == LM_TINY else QUIET
    try:
        train(load_config(config, [f"output_dir={out}", "resume=never", *quiet, *overrides]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _last_window(rows: list[dict]) -> dict:
    return [r for r in rows if "loss" in r][-1]


def _cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full = dict(os.environ, WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


# --- the checks ---------------------------------------------------------------------------

def environment(ctx: Context) -> dict:
    import torch

    from train.metrics import PEAK_TFLOPS, peak_flops

    figures = {"python": platform.python_version(), "torch": torch.__version__,
               "cuda_available": torch.cuda.is_available()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
        name = torch.cuda.get_device_name(0)
        figures.update(gpu=name, memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                       nccl=".".join(map(str, torch.cuda.nccl.version())), driver=driver,
                       datasheet_tflops={k: v for frag, v in PEAK_TFLOPS.items()
                                         if frag in name for k, v in v.items()} or None)
        if not figures["datasheet_tflops"]:
            return {"status": "fail", "figures": figures,
                    "detail": f"{name} is not in train.metrics.PEAK_TFLOPS: MFU would be unknown"}
    else:
        figures.update(cpu=platform.processor() or platform.machine(),
                       threads=torch.get_num_threads(),
                       measured_matmul_tflops=peak_flops(torch.device("cpu"), "no") / 1e12)
    return {"status": "pass", "figures": figures}


def _lm_shape(ctx: Context) -> list[str]:
    if ctx.cuda and not ctx.quick:
        return ["model.d_model=1024", "model.n_layers=12", "model.n_heads=16",
                "model.d_ff=4096", "model.attention_chunk_size=64", "data.tokenizer=byte",
                "data.block_size=2048", "data.batch_size=8", "data.source=builtin:python_stdlib"]
    return ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128",
            "data.tokenizer=byte", "data.block_size=64", "data.batch_size=4"]


def lm_bf16(ctx: Context) -> dict:
    from train.bench.syncs import HostReads

    shape, device = _lm_shape(ctx), f"device={ctx.device}"
    n = 4 if ctx.quick else 20

    def counted(steps: int) -> tuple[int, int]:
        # One log point, one (final) evaluation and one checkpoint, however many steps.
        with HostReads() as reads:
            _train(LM_TINY, ctx.runs("lm_bf16") / f"syncs-{steps}",
                   [*shape, device, f"max_steps={steps}", f"log_every={steps}",
                    "eval_max_batches=1", "mixed_precision=bf16"])
        return reads.count, getattr(reads, "cuda_syncs", 0)

    counted(2)  # what a process does once (cached masks, the CPU peak measurement, ...)
    (reads_a, syncs_a), (reads_b, syncs_b) = counted(n), counted(2 * n)
    rows = _train(LM_TINY, ctx.runs("lm_bf16") / "speed", [*shape, device, "mixed_precision=bf16",
                  f"max_steps={3 * n}", f"log_every={n}", "eval_max_batches=1"])
    last = _last_window(rows)
    figures = {"tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu"),
               "peak_mem_mb": last["peak_mem_mb"], "step_time_s": last["step_time_s"],
               "host_reads_per_step": (reads_b - reads_a) / n,
               "cuda_syncs_per_step": (syncs_b - syncs_a) / n if ctx.cuda else None}
    ok = figures["host_reads_per_step"] == 0 and not figures["cuda_syncs_per_step"]
    return {"status": "pass" if ok else "fail", "figures": figures,
            "detail": "" if ok else "a training step waited for the device"}


def fp16(ctx: Context) -> dict:
    from train.errors import ConfigError
    from train.optim import lr_factor
    from train.tasks import load_config

    shape = _lm_shape(ctx) if ctx.quick or not ctx.cuda else [
        "model.d_model=512", "model.n_layers=6", "model.n_heads=8", "model.d_ff=2048",
        "data.tokenizer=byte", "data.block_size=1024", "data.batch_size=8",
        "data.source=builtin:python_stdlib"]
    steps = 8 if ctx.quick else 60
    common = [*shape, f"device={ctx.device}", f"max_steps={steps}", "log_every=1",
              "eval_max_batches=1", "optim.warmup_steps=4"]
    figures: dict = {}
    if ctx.cuda:
        rows = [r for r in _train(LM_TINY, ctx.runs("fp16") / "cuda",
                                  [*common, "mixed_precision=fp16"]) if "loss" in r]
        config = load_config(LM_TINY, ["output_dir=x", *common])
        factor = lr_factor(config)  # common sets max_steps=steps
        figures.update(
            losses_finite=all(math.isfinite(r["loss"]) for r in rows),
            fp16_skipped_steps=rows[-1]["fp16_skipped_steps"],
            lr_follows_the_schedule=all(math.isclose(r["lr"], config.optim.lr * factor(r["step"]),
                                                     rel_tol=1e-9) for r in rows))
        precision = "mixed_precision=fp16"
    else:
        try:  # fp16 on a CPU is refused, not silently run in fp32
            load_and_run = _train(LM_TINY, ctx.runs("fp16") / "cpu",
                                  [*common, "mixed_precision=fp16"])
            figures["fp16_on_cpu"] = f"ran ({len(load_and_run)} rows): should have been refused"
        except ConfigError as exc:
            figures["fp16_on_cpu"] = f"refused: {exc}"
        precision = "mixed_precision=no"
    # A forced overflow at step 3: the step is skipped (weights untouched) and counted.
    rows = [r for r in _train(LM_TINY, ctx.runs("fp16") / "overflow", [*common, precision],
                              env={"TRAIN_FAULT_NONFINITE": "3"}) if "loss" in r]
    figures.update(forced_overflow_counted=rows[-1]["nonfinite_steps"] == 1,
                   finite_after_overflow=all(math.isfinite(r["loss"]) for r in rows[3:]))
    checks = [v for k, v in figures.items() if isinstance(v, bool)]
    if not ctx.cuda:
        checks.append(figures["fp16_on_cpu"].startswith("refused"))
    return {"status": "pass" if all(checks) else "fail", "figures": figures,
            "detail": "" if ctx.cuda else "fp16 itself needs CUDA: its refusal was checked"}


def attention(ctx: Context) -> dict:
    import torch

    from train.bench.attention import QUICK, Settings, run

    if ctx.quick:
        settings = QUICK
    else:
        settings = Settings(lengths=(1024, 4096, 16384, 65536), batch=1, heads=16, dim=64,
                            library_max_len=65536, repeats=3, positions=(128, 1024, 4096),
                            step_samples=5, matmul_size=8192, time_budget_s=0.5)
    report = run(settings, torch.device(ctx.device))
    rows = []
    for row in report["parallel"]:
        rows.append({"L": row["L"], "chunked_ms": row["chunked"]["ms"],
                     "chunked_peak_mb": row["chunked"]["peak_mb"],
                     "sdpa_ms": row["sdpa"]["ms"], "sdpa_peak_mb": row["sdpa"]["peak_mb"],
                     "library_ms": row["library"]["ms"] if row["library"] else None,
                     "library": row.get("library_skipped", "measured"),
                     "rel_err_vs_fp32": row.get("rel_err_vs_fp32"),
                     **_flash_linear(row["L"], settings, ctx)})
    worst = max((r["rel_err_vs_fp32"] or 0.0) for r in rows)
    ok = worst < 2e-2  # bf16 has 8 bits of mantissa; the state is accumulated in fp32
    return {"status": "pass" if ok else "fail",
            "figures": {"dtype": report["dtype"], "rows": rows, "worst_rel_err_vs_fp32": worst},
            "detail": "" if ok else f"bf16 error {worst:.3g} against fp32"}


def _flash_linear(L: int, settings, ctx: Context) -> dict:
    """flash-linear-attention's chunked kernel on the same shapes, when it is installed."""
    if not ctx.cuda:
        return {"fla_ms": None, "fla": "CUDA only"}
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # not installed, or built for another torch
        return {"fla_ms": None, "fla": f"not available ({type(exc).__name__})"}
    import torch

    from train.bench.attention import _best_time

    shape = (settings.batch, settings.heads, L, settings.dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step():
        out = chunk_linear_attn(q.relu(), k.relu(), v, normalize=True)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return {"fla_ms": _best_time(step, torch.device("cuda"), settings.repeats) * 1e3,
            "fla": "measured"}


def vision(ctx: Context) -> dict:
    if ctx.quick:
        common = ["model.name=resnet18", "data.image_size=32", "data.batch_size=16",
                  "data.source=builtin:synthetic", "data.max_train_samples=256", "max_steps=6",
                  "log_every=3", "eval_max_batches=1", "data.augment=none", "example_images=0"]
    else:
        common = ["model.name=resnet50", "model.channels_last=true", "data.image_size=224",
                  "data.batch_size=128", "data.source=builtin:synthetic", "max_steps=40",
                  "log_every=10", "eval_max_batches=1", "data.augment=none",
                  "data.num_workers=8", "data.pin_memory=true", "example_images=0"]
    precision = "mixed_precision=bf16" if ctx.cuda else "mixed_precision=no"
    figures = {}
    for compiled in ((False, True) if ctx.cuda else (False,)):
        name = "compiled" if compiled else "eager"
        rows = _train(VISION_TINY, ctx.runs("vision") / name, [*common, precision,
                      f"device={ctx.device}", f"compile={str(compiled).lower()}"])
        last = _last_window(rows)
        figures[name] = {"images_per_s": last["images_per_s"], "mfu": last.get("mfu"),
                         "peak_mem_mb": last["peak_mem_mb"]}
    if ctx.cuda:
        figures["compile_speedup"] = (figures["compiled"]["images_per_s"]
                                      / figures["eager"]["images_per_s"])
    return {"status": "pass", "figures": figures,
            "detail": "" if ctx.cuda else "compile: true measured on CUDA only"}


def fsdp(ctx: Context) -> dict:
    out = ctx.runs("fsdp") / "run"
    shape = _lm_shape(ctx)
    launch = ["-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "launch" / "accelerate" / "fsdp_transformer.yaml"), "--num_processes",
              "1"]
    if not ctx.cuda:
        launch += ["--cpu"]
    args = ["-m", "train", str(LM_TINY), f"output_dir={out}", *QUIET, "lm.sample_tokens=0", *shape,
            "checkpoint_every=3", "log_every=3", "eval_max_batches=1"]
    first = _cli(*launch, *args, "max_steps=3")
    if first.returncode != 0:
        return {"status": "fail", "detail": "training: " + first.stderr[-800:]}
    if ctx.cuda:  # resuming a sharded checkpoint; on CPU it would be the plain DDP resume again
        second = _cli(*launch, *args, "max_steps=6")
        if second.returncode != 0 or "resumed from" not in second.stderr:
            return {"status": "fail", "detail": "resume: " + second.stderr[-800:]}
    sample = _cli("-m", "train.generate", str(out), "--prompt", "def ", "--max-new-tokens", "16",
                  env={"CUDA_VISIBLE_DEVICES": ""})
    saved = sorted({p.name for p in (out / "checkpoints").glob("step_*/*")})
    figures = {"checkpoint_files": saved, "sharded": any("fsdp_0" in n for n in saved),
               "generate_exit": sample.returncode}
    ok = sample.returncode == 0 and (figures["sharded"] or not ctx.cuda)
    detail = "" if ctx.cuda else "on CPU Accelerate runs this config as plain DDP"
    return {"status": "pass" if ok else "fail", "figures": figures,
            "detail": detail if ok else sample.stderr[-800:]}


def resume(ctx: Context) -> dict:
    from train.errors import StoppedBySignal

    shape = _lm_shape(ctx)
    common = [*shape, f"device={ctx.device}", "max_steps=12", "log_every=1", "eval_every=1000",
              "eval_max_batches=1", "checkpoint_every=1000", "model.dropout=0.1",
              "deterministic=true"]
    straight = _train(LM_TINY, ctx.runs("resume") / "straight", common)
    try:
        _train(LM_TINY, ctx.runs("resume") / "stopped", common,
               env={"TRAIN_FAULT_SIGNAL": "5:0:USR1"})
        return {"status": "fail", "detail": "the stop signal did not stop the run"}
    except StoppedBySignal:
        pass
    from train.loop import train
    from train.tasks import load_config

    train(load_config(LM_TINY, [f"output_dir={ctx.runs('resume') / 'stopped'}", *QUIET,
                                "lm.sample_tokens=0", *common]))
    resumed = [json.loads(line) for line in
               (ctx.runs("resume") / "stopped" / "metrics.jsonl").read_text().splitlines()]
    a = [(r["step"], r["loss"]) for r in straight if "loss" in r]
    b = [(r["step"], r["loss"]) for r in resumed if "loss" in r]
    if [s for s, _ in a] != [s for s, _ in b]:
        return {"status": "fail", "detail": f"steps differ: {[s for s, _ in b]}"}
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    return {"status": "pass" if worst == 0 else "fail",
            "figures": {"bitwise": worst == 0, "max_abs_loss_difference": worst},
            "detail": "" if worst == 0 else "deterministic: true should make them bitwise equal"}


def gpu_to_cpu(ctx: Context) -> dict:
    run = ctx.runs("resume") / "stopped"
    if not (run / "checkpoints").is_dir():
        raise Skipped("needs the resume check's run")
    sample = _cli("-m", "train.generate", str(run), "--prompt", "def ", "--max-new-tokens", "20",
                  "--seed", "0", env={"CUDA_VISIBLE_DEVICES": ""})
    ok = sample.returncode == 0 and sample.stdout.startswith("def ")
    return {"status": "pass" if ok else "fail", "figures": {"sample": sample.stdout[:80]},
            "detail": "" if ok else sample.stderr[-800:]}


CHECKS = [environment, lm_bf16, fp16, attention, vision, fsdp, resume, gpu_to_cpu]


# --- the report ---------------------------------------------------------------------------

def run_checks(ctx: Context, only: list[str] | None = None) -> dict:
    ctx.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for check in CHECKS:
        if only and check.__name__ not in only:
            continue
        start = time.perf_counter()
        # A check's runs from an earlier invocation would be resumed or refused: start afresh.
        shutil.rmtree(ctx.runs(check.__name__), ignore_errors=True)
        try:
            result = check(ctx)
        except Skipped as exc:
            result = {"status": "skipped", "detail": str(exc)}
        except Exception as exc:  # a failed check is reported; the others still run
            result = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[check.__name__] = result
        print(f"{check.__name__:<12} {result['status']:<8} {result['seconds']:>6.1f} s  "
              f"{result.get('detail', '')[:100]}", file=sys.stderr, flush=True)
    report = {"device": ctx.device, "quick": ctx.quick, "checks": results,
              "passed": all(r["status"] != "fail" for r in results.values())}
    (ctx.out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))
    (ctx.out / "gpu_report.md").write_text(markdown(report))
    return report


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return " ".join(str(value).split())  # one line in a table cell


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}{', quick' if report['quick'] else ''}): "
             + ("passed" if report["passed"] else "FAILED"), "",
             "| check | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in report["checks"].items():
        figures = {k: v for k, v in r.get("figures", {}).items() if k != "rows"}
        text = "; ".join(f"{k}: {_short(v)}" for k, v in figures.items())
        if r.get("detail"):
            text += f" ({r['detail'][:160]})"
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {text.replace('|', '/')} |")
    rows = report["checks"].get("attention", {}).get("figures", {}).get("rows")
    if rows:
        lines += ["", "| L | chunked ms | chunked MB | SDPA ms | SDPA MB | library ms | fla ms | "
                  "rel. err. vs fp32 |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['L']} | {_short(r['chunked_ms'])} | {_short(r['chunked_peak_mb'])}"
                         f" | {_short(r['sdpa_ms'])} | {_short(r['sdpa_peak_mb'])} | "
                         f"{_short(r['library_ms']) if r['library_ms'] else r['library']} | "
                         f"{_short(r['fla_ms']) if r['fla_ms'] else r['fla']} | "
                         f"{_short(r['rel_err_vs_fp32'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m train.bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the parts that run on a CPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--only", action="append", help="run only this check (repeatable)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run with --cpu --quick for the CPU part",
              file=sys.stderr)
        return 2
    report = run_checks(Context("cpu" if args.cpu else "cuda", args.quick, args.out), args.only)
    print(f"report: {args.out / 'gpu_report.md'}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
