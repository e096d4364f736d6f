"""The optimizer (AdamW or SGD with Nesterov momentum, weight decay per kind of parameter) and
learning-rate schedules: a linear warm-up, then cosine, linear, step or constant, all in
optimizer steps; the `lr` a run logs follows the configured one."""

import pytest
import torch

from conftest import ROOT, train_here
from train.config import OptimConfig
from train.errors import ConfigError
from train.optim import optimizer_for, param_groups, warmup_then
from train.tasks import load_config as load

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


def test_decay_steps_sets_where_the_schedule_ends():
    from train.optim import lr_factor

    config = load(LM_TINY, ["output_dir=x", "max_steps=200", "optim.warmup_steps=50",
                            "optim.min_lr_ratio=0.1"])
    assert lr_factor(config)(200) == pytest.approx(0.1)
    longer = load(LM_TINY, ["output_dir=x", "max_steps=200", "optim.warmup_steps=50",
                            "optim.min_lr_ratio=0.1", "optim.decay_steps=400"])
    # Step 200 of a 400-step cosine: half-way down, as the 400-step run has it there.
    assert lr_factor(longer)(200) == pytest.approx(
        lr_factor(load(LM_TINY, ["output_dir=x", "max_steps=400", "optim.warmup_steps=50",
                                 "optim.min_lr_ratio=0.1"]))(200))
    assert 0.1 < lr_factor(longer)(200) < 1


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


def _small_convnet():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.Flatten(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))


def test_weight_decay_per_kind_of_parameter():
    model = _small_convnet()
    conv, bn, _, ln, fc = model
    names = {id(p): n for n, p in model.named_parameters()}

    def groups(**cfg):
        return [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"])
                for g in param_groups(model, OptimConfig(weight_decay=0.1, **cfg))]

    # The default: kernels and matrices decay, every 1-D parameter does not (two groups, as
    # checkpoints of earlier runs hold them).
    assert groups() == [(["0.weight", "4.weight"], 0.1),
                        (["0.bias", "1.bias", "1.weight", "3.bias", "3.weight", "4.bias"], 0.0)]
    assert groups(norm_weight_decay=0.01, bias_weight_decay=0.05) == [
        (["0.weight", "4.weight"], 0.1), ([], 0.0),
        (["1.bias", "1.weight", "3.bias", "3.weight"], 0.01), (["0.bias", "4.bias"], 0.05)]


def test_sgd_takes_nesterov_momentum_steps_and_skips_non_finite_ones():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    optimizer = optimizer_for(torch.nn.Linear(1, 1), cfg)  # the right class and settings...
    assert isinstance(optimizer, torch.optim.SGD)
    optimizer = torch.optim.SGD(  # ...then the same over one matrix, checked by hand
        [{"params": [w], "weight_decay": 0.01}], **{k: optimizer.defaults[k] for k in
                                                    ("lr", "momentum", "nesterov", "fused")})
    expected, buf = w.detach().clone(), None
    for grad in (torch.ones(3, 2), 2 * torch.ones(3, 2)):
        w.grad = grad.clone()
        g = grad + 0.01 * expected
        buf = g if buf is None else 0.9 * buf + g
        expected -= 0.1 * (g + 0.9 * buf)
        optimizer.step()
        assert torch.allclose(w.detach(), expected)
    optimizer.found_inf = torch.ones(())  # as the loop sets it for a non-finite step
    w.grad = torch.ones(3, 2)
    optimizer.step()
    assert torch.allclose(w.detach(), expected)


def test_nesterov_without_momentum_is_refused():
    with pytest.raises(ConfigError, match=r"nesterov=true needs momentum > 0"):
        load(LM_TINY, ["output_dir=x", "optim.name=sgd", "optim.nesterov=true",
                       "optim.momentum=0"])
