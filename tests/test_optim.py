"""Learning-rate schedules: a linear warm-up, then cosine, linear, step or constant, all in
optimizer steps; the `lr` a run logs follows the configured one."""

import pytest

from conftest import ROOT, train_here
from train.optim import warmup_then

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step", "constant"])
def test_the_warmup_is_linear_and_reaches_the_peak_lr(schedule):
    factor = warmup_then(schedule, 4, 20, min_ratio=0.1, step_every=5, step_gamma=0.5)
    assert [factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_each_schedule_after_the_warmup():
    cosine = warmup_then("cosine", 4, 20, min_ratio=0.1)
    assert cosine(12) == pytest.approx(0.55) and cosine(20) == pytest.approx(0.1)
    linear = warmup_then("linear", 4, 20, min_ratio=0.1)
    assert [linear(s) for s in (8, 12, 20)] == pytest.approx([0.775, 0.55, 0.1])
    step = warmup_then("step", 4, 20, step_every=5, step_gamma=0.5)
    assert [step(s) for s in (8, 9, 14, 19)] == [1.0, 0.5, 0.25, 0.125]
    assert warmup_then("constant", 4, 20)(19) == 1.0


def test_a_run_logs_the_lr_of_its_schedule(tmp_path):
    rows, error = train_here(
        LM_TINY, f"output_dir={tmp_path / 'run'}", "max_steps=6", "log_every=1",
        "eval_every=100", "wandb.mode=disabled", "progress_bar=false", "lm.sample_tokens=0",
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "data.tokenizer=byte", "data.block_size=32", "data.batch_size=8",
        "optim.warmup_steps=0", "optim.schedule=step", "optim.step_every=2",
        "optim.step_gamma=0.5", "optim.lr=0.001")
    assert error is None
    logged = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    # The lr logged at step s is the one step s + 1 will use: factor(s).
    assert logged == [(s, pytest.approx(0.001 * 0.5 ** (s // 2))) for s in range(1, 7)]
