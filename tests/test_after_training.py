"""The commands after training.

`python -m train.evaluate RUN_DIR [CHECKPOINT] [--ema] [overrides]`: a checkpoint's metrics on
the run's validation data or other data, the same in one process or several, with an image
classifier's accuracy per class and confusion matrix; bad input exits 2 and writes nothing.

`python -m train.predict RUN_DIR IMAGE_OR_DIR...`: class names and probabilities per image file,
as the model gives them for the run's own validation preprocessing; unreadable files are
reported and skipped.

`python -m train.export RUN_DIR OUT_DIR`: weights, class names and a README whose Python runs
the model with torchvision alone, giving what train.predict gives."""

import csv
import io
import json

import pytest
import torch
from PIL import Image

from conftest import ROOT, run_exported_readme, run_torchrun, train_here
from train.evaluate import main as evaluate
from train.export import main as export
from train.predict import main as predict

VISION = ROOT / "configs" / "vision_tiny.yaml"


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    rows, error = train_here(VISION, f"output_dir={run}", "max_steps=2", "log_every=1",
                             "eval_every=2", "checkpoint_every=2", "wandb.mode=disabled",
                             "progress_bar=false", "device=cpu", "model.name=resnet18",
                             "data.image_size=16", "data.batch_size=8",
                             "data.max_train_samples=64", "data.max_val_samples=50",
                             "ema.decay=0.5")
    assert error is None
    return run, [r for r in rows if "val/top1" in r][-1]


def test_a_checkpoint_reports_what_the_run_logged_per_class_and_as_a_confusion_matrix(
        vision_run, capsys):
    run, logged = vision_run
    assert evaluate([str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((run / "eval" / "step_00000002.json").read_text())
    assert printed["val/top1"] == report["val/top1"] == logged["val/top1"]
    assert report["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert report["val/count"] == 50 and report["classes"] == [str(d) for d in range(10)]
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == 50
    assert sum(matrix[i][i] for i in range(10)) == round(report["val/top1"] * 50)
    for i, name in enumerate(report["classes"]):  # a class's accuracy is its row's diagonal
        row = sum(matrix[i])
        assert report["per_class_top1"][name] == (matrix[i][i] / row if row else None)
    with Image.open(report["confusion_png"]) as png:
        assert png.size == (510, 510)  # 10 classes x 51 px

    assert evaluate([str(run), "--ema"]) == 0  # the moving average: what the run logged too
    ema = json.loads((run / "eval" / "step_00000002-ema.json").read_text())
    assert ema["val/top1"] == logged["val_ema/top1"] and ema["ema"] is True
    assert ema["val/loss"] == pytest.approx(logged["val_ema/loss"], rel=1e-6)


def test_the_report_goes_to_wandb_too_with_the_confusion_matrix(vision_run, tmp_path):
    from conftest import read_wandb_run

    run, _ = vision_run
    assert evaluate([str(run), "wandb.mode=offline", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    recorded = read_wandb_run(run)  # the training run had W&B off: this is the evaluation
    assert len(recorded["run_ids"]) == 1
    row = recorded["history"][-1]
    assert row["val/top1"] == report["val/top1"] and row["val/count"] == 50
    assert row["confusion_matrix/_type"] == "image-file"
    assert (row["confusion_matrix/width"], row["confusion_matrix/height"]) == (510, 510)
    assert row["per_class/_type"] == "table-file" and row["per_class/nrows"] == 10


def test_other_data_through_overrides_and_a_chosen_checkpoint(vision_run, tmp_path):
    run, _ = vision_run
    out = tmp_path / "small.json"
    assert evaluate([str(run), str(run / "checkpoints" / "step_00000002"),
                     "data.max_val_samples=20", "data.eval_batch_size=7", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["val/count"] == 20 and report["checkpoint"].endswith("step_00000002")


@pytest.mark.parametrize("args, message", [
    (["{run}/checkpoints/step_00000099"], "unreadable loop_state.json"),
    (["data.max_val_samples=0"], "data.max_val_samples=0"),
    (["{run}/checkpoints/step_00000002", "--ema", "model.name=resnet34"], "Missing key"),
], ids=["not-a-checkpoint", "bad-override", "other-model"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(vision_run, capsys, args, message):
    run, _ = vision_run
    before = sorted((run / "eval").glob("*")) if (run / "eval").exists() else []
    assert evaluate([str(run), *(a.format(run=run) for a in args)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (sorted((run / "eval").glob("*")) if (run / "eval").exists() else []) == before


@pytest.mark.slow
def test_two_processes_report_what_one_does(vision_run, tmp_path):
    run, _ = vision_run
    assert evaluate([str(run), "--out", str(tmp_path / "one.json")]) == 0
    run_torchrun(2, "train.evaluate", run, "--out", tmp_path / "two.json")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and two["val/count"] == one["val/count"] == 50
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)
    assert two["val/top1"] == one["val/top1"] and two["confusion_matrix"] == one["confusion_matrix"]


def _validation_images_as_files(run, folder, count):
    """The run's first validation images as PNG files, and what the model gives for them
    through the run's own validation set (the loop's path)."""
    from train.checkpoint import latest_checkpoint, load_model_weights
    from train.tasks import build_task, load_config

    task = build_task(load_config(run / "config.yaml", [f"output_dir={run}"]))
    _, val_set = task.datasets()
    model = task.model()
    model.load_state_dict(load_model_weights(latest_checkpoint(run), model))
    folder.mkdir()
    for i in range(count):
        val_set.raw(i)[0].save(folder / f"{i:02d}.png")
    images = torch.stack([val_set[i][0] for i in range(count)])
    with torch.no_grad():
        return model.eval()(images).softmax(dim=1)


def test_predict_names_the_classes_the_model_gives_each_image(vision_run, tmp_path, capsys):
    run, _ = vision_run
    assert json.loads((run / "classes.json").read_text()) == [str(d) for d in range(10)]
    expected = _validation_images_as_files(run, tmp_path / "images", 5)
    assert predict([str(run), str(tmp_path / "images"), "--format", "json", "--top-k", "3",
                    "--batch-size", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == [str(tmp_path / "images" / f"{i:02d}.png")
                                            for i in range(5)]
    for result, probabilities in zip(results, expected):
        top = probabilities.topk(3)
        assert [t["class"] for t in result["top"]] == [str(i) for i in top.indices.tolist()]
        assert [t["probability"] for t in result["top"]] == pytest.approx(top.values.tolist(),
                                                                          abs=1e-5)
    assert predict([str(run), str(tmp_path / "images" / "03.png"), "--format", "csv",
                    "--top-k", "2"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "rank", "class", "probability"] and len(rows) == 3


def test_predict_skips_unreadable_files_naming_them(vision_run, tmp_path, capsys):
    run, _ = vision_run
    _validation_images_as_files(run, tmp_path / "images", 2)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "images" / "notes.jpg").write_text("not an image")
    assert predict([str(run), str(tmp_path / "images")]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "broken.png" in captured.err and "notes.jpg" in captured.err
    assert "Traceback" not in captured.err
    assert predict([str(run), str(tmp_path / "images" / "broken.png")]) == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err
    assert predict([str(tmp_path), str(tmp_path / "images")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_export_runs_with_torchvision_alone_and_agrees_with_predict(vision_run, tmp_path,
                                                                    capsys):
    run, _ = vision_run
    _validation_images_as_files(run, tmp_path / "images", 1)
    image, out = tmp_path / "images" / "00.png", tmp_path / "export"
    assert export([str(run), str(out), "--ema"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "classes.json", "config.yaml",
                                                     "model.safetensors"]
    # With this project unimportable: the README's code needs torchvision alone.
    exported = json.loads(run_exported_readme(out, "print(json.dumps(classify(sys.argv[1], 3)))",
                                              str(image)))
    capsys.readouterr()
    assert predict([str(run), str(image), "--ema", "--format", "json", "--top-k", "3"]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]["top"]
    assert [c for c, _ in exported] == [t["class"] for t in predicted]
    assert [p for _, p in exported] == pytest.approx([t["probability"] for t in predicted],
                                                     abs=1e-5)
    # A text classifier's run: not exportable, said so, nothing written.
    text_run = tmp_path / "text_run"
    text_run.mkdir()
    text_run.joinpath("config.yaml").write_text(
        (ROOT / "configs" / "text_classify_tiny.yaml").read_text())
    assert export([str(text_run), str(tmp_path / "text_export")]) == 2
    assert "train.export exports image classifiers, language models and seq2seq models" \
        in capsys.readouterr().err
    assert not (tmp_path / "text_export").exists()
    # Never over an existing export: refused, nothing touched.
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert export([str(run), str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
