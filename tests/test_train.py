"""End to end: `python -m train` and `python -m train.generate` as subprocesses, a 2-rank
`torchrun` run on CPU (gloo), and the loop's guarantees on runs in this process."""

import math
import re

import pytest
import torch
import yaml
from accelerate import Accelerator

from conftest import (ROOT, cli_env, read_jsonl, read_wandb_run, run_module, run_torchrun,
                      train_here)
from train.bench.syncs import HostReads
from train.tasks import load_config as load
from train.tasks.lm import LanguageModelingTask

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
# A model small enough that a handful of steps takes seconds on 2 cores, on byte tokens.
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "data.tokenizer=byte", "data.block_size=32", "data.batch_size=8", "optim.warmup_steps=2",
        "lm.sample_tokens=16"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    proc = run_module("train", LM_TINY, f"output_dir={out}", "max_steps=6", "log_every=2",
                      "eval_every=3", "checkpoint_every=3", "wandb.mode=offline", *TINY)
    return out, proc


def test_run_directory_holds_resolved_config_metrics_and_checkpoints(lm_run):
    out, _ = lm_run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 6 and saved["model"]["d_model"] == 32
    assert saved["data"]["num_workers"] == 0  # defaults are written out, not left implicit
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1 and r["peak_mem_mb"] > 0
        assert r["model_tflops_per_s"] > 0 and 0 < r["mfu"] < 2  # CPU peak: a measured matmul
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    evals = [r for r in rows if "val/bpb" in r]
    assert [r["step"] for r in evals] == [3, 6]
    # Byte tokens: one token per byte, plus an EOS after each document (here one).
    assert evals[-1]["val/bpb"] == pytest.approx(evals[-1]["val/loss"] / math.log(2), rel=1e-3)
    assert evals[-1]["val/bpb"] > evals[-1]["val/loss"] / math.log(2)
    assert isinstance(evals[-1]["sample"], str)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]


def test_eval_counts_every_validation_token_once(lm_run):
    out, _ = lm_run
    assert read_jsonl(out / "metrics.jsonl")[-1]["val/tokens"] == _val_targets(
        load(out / "config.yaml"))


def _val_targets(config) -> int:
    """Tokens the validation set asks the model to predict."""
    _, val = LanguageModelingTask(config).datasets()
    return sum(int((val[i]["labels"] != -100).sum()) for i in range(len(val)))


def test_wandb_offline_run_holds_config_and_history(lm_run):
    out, _ = lm_run
    wandb_run = read_wandb_run(out)
    assert len(wandb_run["run_ids"]) == 1
    assert wandb_run["config"]["max_steps"] == 6
    assert wandb_run["config"]["model"]["d_model"] == 32
    logged = {row["_step"]: row for row in wandb_run["history"]}
    jsonl = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    for step, row in jsonl.items():
        assert logged[step]["loss"] == pytest.approx(row["loss"])
    assert any("val/bpb" in row for row in wandb_run["history"])


def test_generate_prints_a_continuation(lm_run, capsys):
    from train.generate import main as generate

    out, _ = lm_run
    proc = run_module("train.generate", out, "--prompt", "The ", "--max-new-tokens", "20",
                      "--top-k", "5", "--seed", "3")
    assert proc.stdout.startswith("The ") and len(proc.stdout) > len("The ")
    assert generate([str(out), "--prompt", "The ", "--max-new-tokens", "20", "--top-k", "5",
                     "--seed", "3"]) == 0
    # The same seed, the same text (the subprocess's output was read with universal newlines).
    assert capsys.readouterr().out.replace("\r\n", "\n").replace("\r", "\n") == proc.stdout
    assert generate([str(out), "--ema"]) == 2  # this run kept no moving average
    assert "holds no moving average of the weights" in capsys.readouterr().err


def test_generate_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    from train.generate import main as generate

    assert generate([str(tmp_path), "--prompt", "x"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_generate_refuses_a_task_that_does_not_generate(tmp_path, capsys):
    from train.generate import main as generate

    (tmp_path / "config.yaml").write_text((ROOT / "configs" / "vision_tiny.yaml").read_text())
    assert generate([str(tmp_path), "--prompt", "x"]) == 2
    assert "does not generate" in capsys.readouterr().err


def test_restarted_run_resumes_from_its_latest_checkpoint(lm_run, capsys):
    out, _ = lm_run
    _, error = train_here(out / "config.yaml", "max_steps=8", "log_every=2", "eval_every=100",
                          "checkpoint_every=100")
    err = capsys.readouterr().err
    assert error is None and "resumed from" in err and "step_00000006" in err
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == [2, 4, 6, 8]
    assert set(read_wandb_run(out)["run_ids"]) and len(set(read_wandb_run(out)["run_ids"])) == 1


def test_lstm_trains_through_the_same_loop(tmp_path):
    out = tmp_path / "lstm"
    rows, _ = train_here(LM_TINY, f"output_dir={out}", "max_steps=4", "log_every=2",
                         "eval_every=4", "wandb.mode=disabled", "model.arch=lstm", *TINY)
    assert rows[-1]["step"] == 4 and math.isfinite(rows[-1]["val/loss"])
    assert not (out / "wandb").exists()


def test_two_rank_torchrun_shards_data_and_logs_once(tmp_path):
    """Also a W&B sweep agent's command line under torchrun: --key=value flags (booleans as
    Python writes them) reach every rank as overrides, and the W&B run records them."""
    src = tmp_path / "text.txt"
    src.write_text("".join(f"{i} bottles of beer on the wall\n" for i in range(421)))
    out = tmp_path / "ddp"
    proc = run_torchrun(2, "train", LM_TINY, f"output_dir={out}", f"data.source={src}",
                        "max_steps=4", "log_every=2", "eval_every=4", "wandb.mode=offline",
                        "device=cpu", *TINY, "--optim.lr=0.003", "--optim.warmup_steps=0",
                        "--model.tie_embeddings=True")
    assert "2 process(es) on cpu" in proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]  # one writer, not one per rank
    # Each optimizer step consumed batch_size samples on each of the 2 ranks.
    first = next(r for r in rows if "loss" in r)
    assert first["tokens_per_s"] == pytest.approx(first["samples_per_s"] * 32, rel=1e-6)
    config = load(LM_TINY, [f"output_dir={out}", f"data.source={src}", *TINY])
    assert len(LanguageModelingTask(config).datasets()[1]) % 2 == 1, "want an odd-sized val set"
    assert rows[-1]["val/tokens"] == _val_targets(config)
    recorded = read_wandb_run(out)
    assert len(recorded["run_ids"]) == 1
    assert recorded["config"]["optim"]["lr"] == 0.003
    assert recorded["config"]["model"]["tie_embeddings"] is True
    # The swept lr is the one the steps used (cosine from 0.003 over 4 steps, no warm-up).
    assert first["lr"] == pytest.approx(0.003 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))


def test_single_process_harness_runs_on_gloo(gloo_world, monkeypatch):
    """The in-process harness: Accelerate on an initialized world-size-1 gloo group."""
    import torch.distributed as dist

    from train.loop import evaluate
    from train.tasks.lm import LanguageModelingTask

    assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
    config = load(LM_TINY, ["output_dir=unused", *TINY])
    task = LanguageModelingTask(config)
    model = task.model()
    accelerator = Accelerator(cpu=True)
    batch = {"input_ids": torch.randint(0, 256, (3, 32)), "labels": torch.randint(0, 256, (3, 32))}
    batch["labels"][0, :5] = -100
    results = evaluate(accelerator, task, model, [batch, batch], None)
    assert results["val/tokens"] == 2 * (3 * 32 - 5)


def test_ema_follows_its_recurrence_is_evaluated_and_checkpointed(tmp_path):
    """ema.decay: a copy of the weights until warmup_steps, then every every_steps steps
    ema = decay * ema + (1 - decay) * weights; evaluated as val_ema/*, saved in checkpoints."""
    from safetensors.torch import load_file

    from train.checkpoint import load_ema_weights
    from train.generate import main as generate_main

    out = tmp_path / "run"
    rows, error = train_here(LM_TINY, f"output_dir={out}", "max_steps=6", "log_every=2",
                             "eval_every=6", "checkpoint_every=2", "keep_checkpoints=3",
                             "wandb.mode=disabled", *TINY, "lm.sample_tokens=0",
                             "ema.decay=0.75", "ema.every_steps=2", "ema.warmup_steps=2")
    assert error is None
    ckpt = [out / "checkpoints" / f"step_{s:08d}" for s in (2, 4, 6)]
    weights = [load_file(c / "model.safetensors") for c in ckpt]
    ema = [load_ema_weights(c) for c in ckpt]
    assert ema[0].keys() >= weights[0].keys()
    for name in weights[0]:
        assert torch.equal(ema[0][name], weights[0][name])  # step 2: still warming up, a copy
        expected = 0.75 * ema[0][name] + 0.25 * weights[1][name]
        assert torch.allclose(ema[1][name], expected, atol=1e-7)
        expected = 0.75 * ema[1][name] + 0.25 * weights[2][name]
        assert torch.allclose(ema[2][name], expected, atol=1e-7)
    assert not all(torch.equal(ema[2][k], weights[2][k]) for k in weights[2])
    last = [r for r in rows if "val/bpb" in r][-1]
    assert last["step"] == 6 and last["val_ema/bpb"] != last["val/bpb"]
    assert last["val_ema/tokens"] == last["val/tokens"]
    assert generate_main([str(out), "--ema", "--max-new-tokens", "4"]) == 0


@pytest.mark.slow
def test_compiled_model_trains_like_eager_and_checkpoints_plain_weights(tmp_path):
    """compile=true: torch.compile (inductor) over the whole model, the chunked attention
    kernel included; the same losses as eager within float tolerance."""
    from safetensors.torch import load_file

    # Evaluation at the training batch shape: one more graph (no grad), no dynamic-shape one.
    args = ["max_steps=4", "log_every=2", "eval_every=4", "wandb.mode=disabled", *TINY,
            "data.eval_batch_size=8", "eval_max_batches=1", "lm.sample_tokens=0"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "compiled"
    rows, _ = train_here(LM_TINY, f"output_dir={out}", "compile=true", *args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    eager, _ = train_here(LM_TINY, f"output_dir={tmp_path / 'eager'}", *args)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx([r["loss"] for r in eager if "loss" in r], rel=1e-4)
    weights = load_file(out / "checkpoints" / "step_00000004" / "model.safetensors")
    assert weights and not any("_orig_mod" in k for k in weights)  # loadable without compile


@pytest.mark.parametrize("config, args", [
    (LM_TINY, TINY),
    (ROOT / "configs" / "vision_tiny.yaml",
     ["model.name=mobilenet_v3_small", "data.image_size=16", "data.batch_size=8",
      "data.max_train_samples=64", "data.max_val_samples=16", "example_images=0"]),
], ids=["lm", "vision"])
def test_steps_do_not_wait_for_the_device(tmp_path, config, args):
    """The host reads values from the device once per log interval (and at evaluations and
    checkpoints), never once per step: twice the steps between the same log points, evaluation
    and checkpoint cost no extra read; more log points do."""
    from train.loop import train

    def reads(steps: int, log_every: int) -> int:
        run = load(config, [f"output_dir={tmp_path / f'{steps}_{log_every}'}", f"max_steps={steps}",
                            f"log_every={log_every}", "eval_every=1000", "checkpoint_every=1000",
                            "eval_max_batches=1", "wandb.mode=disabled", "progress_bar=false",
                            "device=cpu", "optim.warmup_steps=2", *args])
        with HostReads() as counted:
            train(run)
        return counted.count

    reads(2, 2)  # builds what a process builds once (e.g. the cached attention masks)
    once = reads(4, 4)
    assert reads(8, 8) == once  # four more steps, no more reads
    assert reads(8, 2) > once  # the counter does see the reads at log time


def test_openmp_threads_spin_briefly_then_sleep_unless_the_user_chose(tmp_path):
    """Spinning OpenMP threads starve whatever shares the cores, threads that sleep at once
    slow every short op (train/__init__.py): the runtime a run loads spins a bounded while,
    unless OMP_WAIT_POLICY or GOMP_SPINCOUNT says otherwise."""
    def spin_count(**chosen: str) -> int:
        env = cli_env(OMP_DISPLAY_ENV="VERBOSE")  # libgomp prints its settings when loaded
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            env.pop(name, None)
        env.update(chosen)
        # Stops at the config check, after torch (and so libgomp) is loaded.
        proc = run_module("train", LM_TINY, f"output_dir={tmp_path}", "max_steps=0", env=env,
                          check=False)
        assert proc.returncode == 2, proc.stderr
        return int(re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr).group(1))

    assert spin_count() == 3000  # libgomp's own default is 300000, about 3 ms
    assert spin_count(OMP_WAIT_POLICY="PASSIVE") == 0
    assert spin_count(OMP_WAIT_POLICY="ACTIVE") > 10**9
    assert spin_count(GOMP_SPINCOUNT="50") == 50
