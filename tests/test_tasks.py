"""The task registry and the loop's contract with a task: a new task is one module that declares
its name, its config schema and its class (here this test file is that module), and nothing else
in the project is edited. Also: the loop tears down on every exit path."""

import signal
import subprocess
import sys

import pytest
import torch
import yaml
from pydantic import Field
from torch.nn import functional as F

from conftest import read_wandb_run, train_here
from train.config import LoaderConfig, RunConfig
from train.errors import ConfigError
from train.tasks import TASKS, load_config, register_task, task_spec

TRUE_WEIGHTS = torch.tensor([[1.5], [-2.0], [0.5], [3.0]])


class RegressionData(LoaderConfig):
    samples: int = Field(512, ge=8)
    noise: float = Field(0.01, ge=0)


class RegressionConfig(RunConfig):
    data: RegressionData = RegressionData()


@register_task("test_regression", RegressionConfig)
class RegressionTask:
    """y = x @ w + noise, fitted by a linear layer: the smallest task the loop can train."""

    collate_fn = None
    length_grouping = None

    def __init__(self, config):
        self.config = config

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.config.data.samples, 4, generator=g)
        y = x @ TRUE_WEIGHTS + self.config.data.noise * torch.randn(len(x), 1, generator=g)
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.random_split(data, [0.9, 0.1], generator=g)

    def model(self):
        return torch.nn.Linear(4, 1)

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y), {"rows": torch.full((), len(x))}

    def flops_per_sample(self, model):
        return 3 * 2 * 4

    def eval_sums(self, model, batch):
        x, y = batch
        return {"squared_error": ((model(x) - y) ** 2).sum(), "count": torch.tensor(len(x))}

    def eval_metrics(self, sums):
        return {"val/mse": sums["squared_error"] / sums["count"]}

    def eval_extras(self, model, step):
        return {}


@pytest.fixture
def regression_config(tmp_path):
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump({
        "task": "test_regression", "output_dir": str(tmp_path / "run"), "max_steps": 60,
        "log_every": 20, "eval_every": 30, "checkpoint_every": 30, "progress_bar": False,
        "wandb": {"mode": "disabled"}, "optim": {"lr": 0.2, "warmup_steps": 0, "weight_decay": 0.0},
        "data": {"batch_size": 16}}))
    return path


def test_a_task_module_is_all_a_new_task_needs(regression_config, tmp_path):
    config = load_config(regression_config)
    assert isinstance(config, RegressionConfig) and config.data.samples == 512
    rows, error = train_here(regression_config)
    assert error is None
    evals = [r["val/mse"] for r in rows if "val/mse" in r]
    assert len(evals) == 2 and evals[-1] < 0.05 < evals[0]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [20, 40, 60]
    assert train_rows[0]["rows_per_s"] > 0 and train_rows[0]["model_tflops_per_s"] > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["task"] == "test_regression" and saved["data"]["noise"] == 0.01
    assert not task_spec("test_regression").generates


def test_a_task_schema_rejects_unknown_keys_with_a_hint(regression_config):
    with pytest.raises(ConfigError, match=r"unknown key 'data.sample' \(did you mean samples"):
        load_config(regression_config, ["data.sample=3"])


def test_an_unknown_task_names_the_registered_ones(regression_config):
    with pytest.raises(ConfigError, match="unknown task; choose one of: .*lm.*test_regression"):
        load_config(regression_config, ["task=regresion"])
    assert {"lm", "classify", "seq2seq", "text_classify"} <= set(TASKS)


def test_a_failure_mid_run_still_restores_handlers_and_closes_the_wandb_run(
        regression_config, monkeypatch):
    import wandb

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    calls, loss = [], RegressionTask.loss

    def failing_loss(self, model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug in a task")
        return loss(self, model, batch)

    monkeypatch.setattr(RegressionTask, "loss", failing_loss, raising=False)
    config = load_config(regression_config, ["wandb.mode=offline", "log_every=1"])
    from train.loop import train

    with pytest.raises(RuntimeError, match="a bug in a task"):
        train(config)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert wandb.run is None  # finished, not left open
    logged = read_wandb_run(regression_config.parent / "run")
    assert [row["_step"] for row in logged["history"] if "loss" in row] == [1, 2]


def test_reading_the_config_schema_imports_no_model_code():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import train.config"],
                         capture_output=True, text=True, check=True).stderr
    modules = {line.split("|")[-1].strip() for line in out.splitlines() if "|" in line}
    assert "pydantic" in modules and "train.config" in modules
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "fast_transformers",
                                                       "torchvision", "datasets")}
    assert not heavy and not {m for m in modules if m.startswith("train.models.")} - {
        "train.models.attention_types"}, sorted(heavy)
