"""The config contract: typed keys, dotted overrides, one clear line + exit 2 on bad input."""

import pytest
import yaml

from train.config import parse_overrides
from train.errors import ConfigError
from train.tasks import load_config as load
from train.tasks.lm import LMConfig
from conftest import ROOT, read_wandb_run, run_module

LM_TINY = ROOT / "configs" / "lm_tiny.yaml"


def test_embedded_defaults_validate():
    config = load(LM_TINY)
    assert isinstance(config, LMConfig)
    assert config.output_dir and config.max_steps >= 1 and isinstance(config.seed, int)
    assert config.model.attention_type == "chunked-causal-linear"


def test_overrides_are_typed_and_nested():
    config = load(LM_TINY, ["max_steps=7", "optim.lr=3e-4", "data.pin_memory=true",
                            "wandb.tags=[a, b]", "seed=5"])
    assert config.max_steps == 7 and config.seed == 5
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.data.pin_memory is True
    assert config.wandb.tags == ["a", "b"]


def test_yaml_boolean_words_stay_words(tmp_path):
    assert load(LM_TINY, ["mixed_precision=no"]).mixed_precision == "no"
    assert load(LM_TINY, ["wandb.name=off"]).wandb.name == "off"
    assert load(LM_TINY, ["data.pin_memory=true"]).data.pin_memory is True
    unquoted = tmp_path / "c.yaml"
    unquoted.write_text(LM_TINY.read_text().replace('mixed_precision: "no"', "mixed_precision: no"))
    assert load(unquoted).mixed_precision == "no"


def test_parse_overrides_builds_a_tree():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e="]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": ""}


@pytest.mark.parametrize("overrides, fragment", [
    (["max_steps=0"], "max_steps=0"),
    (["max_step=10"], "unknown key 'max_step' (did you mean max_steps"),
    (["data.blocksize=3"], "data.blocksize"),
    (["optim.lr=fast"], "optim.lr='fast'"),
    (["mixed_precision=fp8"], "mixed_precision='fp8'"),
    (["model.attention_type=softmaxx"], "unknown attention type 'softmaxx'"),
    (["model.n_heads=3"], "must divide d_model"),
    (["model.attention_decay=multiscale", "model.attention_type=full"],
     "attention_decay=multiscale needs attention_type=chunked-causal-linear"),
    (["model.feed_forward_shift=false", "model.feed_forward_shift_start=0.5"],
     "feed_forward_shift_start=0.5 has no effect without feed_forward_shift=true"),
    (["model.feed_forward_shift_start=2"], "model.feed_forward_shift_start=2"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["noequals"], "expected dotted.key=value"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load(LM_TINY, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_flag_overrides_are_the_same_overrides():
    """`--key=value` is how a W&B sweep agent passes parameters; booleans as True/False."""
    assert parse_overrides(["--optim.lr=0.001", "--compile=True", "--data.tokenizer=bpe:512"]) \
        == parse_overrides(["optim.lr=0.001", "compile=true", "data.tokenizer=bpe:512"])


def test_the_shipped_sweep_runs_as_its_agent_would_run_it(tmp_path, monkeypatch):
    """configs/sweep_lm_tiny.yaml: its command, with ${args} expanded the way `wandb agent`
    does (--key=value, Python's True/False), trains with the swept values, and the W&B run
    records them."""
    from train.__main__ import main

    sweep = yaml.safe_load((ROOT / "configs" / "sweep_lm_tiny.yaml").read_text())
    assert sweep["command"][:4] == ["${env}", "python", "-m", "train"]
    assert sweep["metric"]["name"] == "val/bpb"
    picked = {key: spec["values"][0] if "values" in spec else spec["min"]
              for key, spec in sweep["parameters"].items()}
    assert True in picked.values()  # the boolean form is exercised
    out = tmp_path / "run"
    tiny = [f"output_dir={out}", "max_steps=2", "eval_every=2", "wandb.mode=offline",
            "progress_bar=false", "lm.sample_tokens=0", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.d_ff=64", "data.tokenizer=byte", "data.block_size=32"]
    args = [f"--{key}={value}" for key, value in picked.items()]
    command = [a for a in sweep["command"][4:] if a != "${args}"]
    monkeypatch.chdir(ROOT)  # the agent runs the command from the project's root
    assert main([*command, *tiny, *args]) == 0
    recorded = read_wandb_run(out)["config"]
    for key, value in picked.items():
        section, name = key.split(".")
        assert recorded[section][name] == pytest.approx(value), key


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: lm\n  output_dir: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)
    no_task = tmp_path / "no_task.yaml"
    no_task.write_text("output_dir: x\nmax_steps: 1\n")
    with pytest.raises(ConfigError, match="missing required key 'task'"):
        load(no_task)


def test_cli_rejects_bad_config_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    proc = run_module("train", LM_TINY, f"output_dir={out}", "max_steps=-3", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: max_steps=-3: Input should be greater than or equal to 1"]
    assert not out.exists()


def test_cli_rejects_missing_data_before_writing_anything(tmp_path, capsys):
    from train.__main__ import main

    out = tmp_path / "run"
    assert main([str(LM_TINY), f"output_dir={out}", f"data.source={tmp_path}/none.txt"]) == 2
    err = capsys.readouterr().err
    assert "data.source=" in err and "no such file" in err and "Traceback" not in err
    assert not out.exists()


def test_saved_config_round_trips(tmp_path):
    from train.config import save

    config = load(LM_TINY, ["max_steps=3", f"output_dir={tmp_path}"])
    save(config, tmp_path / "config.yaml")
    again = load(tmp_path / "config.yaml")
    assert again == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == config.optim.lr


RUN_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
               if not p.name.startswith("sweep_")]  # sweep_*.yaml: W&B sweep files


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    from train.tasks import load_config

    assert load_config(path).output_dir


def test_evaluation_batches_default_to_the_training_batch():
    def eval_batch(*overrides):
        return load(LM_TINY, ["data.batch_size=3", *overrides]).data.eval_batch_size

    assert eval_batch("data.eval_batch_size=null") == 3
    assert eval_batch("data.eval_batch_size=5") == 5
    with pytest.raises(ConfigError, match="eval_batch_size"):
        load(LM_TINY, ["data.eval_batch_size=0"])


def test_a_default_head_count_is_checked_against_a_new_width():
    with pytest.raises(ConfigError, match="n_heads=4 must divide d_model=66"):
        load(LM_TINY, ["model.d_model=66"])


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "run").write_text("x"), "is a file, not a directory"),
])
def test_an_output_dir_that_cannot_be_a_run_directory_is_refused_first(tmp_path, make, message):
    from conftest import train_here

    make(tmp_path)
    _, error = train_here(LM_TINY, f"output_dir={tmp_path / 'run'}", "max_steps=1")
    assert isinstance(error, ConfigError) and message in str(error)


def test_fp16_on_a_cpu_is_refused_not_run_as_fp32(tmp_path):
    """Accelerate would accept it and train in fp32: never a silent no-op."""
    from conftest import train_here

    _, error = train_here(LM_TINY, f"output_dir={tmp_path / 'run'}", "max_steps=1", "device=cpu",
                          "mixed_precision=fp16")
    assert isinstance(error, ConfigError) and error.exit_code == 2
    assert "mixed_precision=fp16 needs a CUDA device" in str(error)
    assert not (tmp_path / "run").exists()
