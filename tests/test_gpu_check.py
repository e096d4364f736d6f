"""launch/gpu_check.sh in its CPU mode: every GPU check's CPU part runs here, through the same
script and report, so the script cannot rot between the rare runs on a GPU."""

import json
import subprocess

import pytest

from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow
CHECKS = ["environment", "lm_bf16", "fp16", "attention", "vision", "fsdp", "resume",
          "gpu_to_cpu"]


def test_the_cpu_mode_runs_every_check_and_writes_both_reports(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--cpu", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert proc.returncode == 0, (proc.stderr[-3000:], json.dumps(report["checks"])[-3000:])
    assert list(report["checks"]) == CHECKS and report["passed"]
    checks = report["checks"]
    assert checks["lm_bf16"]["figures"]["host_reads_per_step"] == 0
    assert checks["fp16"]["figures"]["fp16_on_cpu"].startswith("refused")
    assert checks["fp16"]["figures"]["forced_overflow_counted"]
    assert checks["resume"]["figures"]["bitwise"]
    assert checks["gpu_to_cpu"]["figures"]["sample"].startswith("def ")
    assert all(row["chunked_ms"] > 0 for row in checks["attention"]["figures"]["rows"])
    table = (tmp_path / "gpu_report.md").read_text()
    assert table.startswith("# GPU check (cpu, quick): passed")
    assert all(f"| {name} |" in table for name in CHECKS)

    # Run again into the same folder (the default --out is always the same): a check's runs
    # from before are replaced, not resumed or refused.
    from train.bench.gpu import main

    assert main(["--cpu", "--quick", "--out", str(tmp_path), "--only", "fp16"]) == 0
    again = json.loads((tmp_path / "gpu_report.json").read_text())
    assert list(again["checks"]) == ["fp16"] and again["passed"]


def test_without_a_gpu_the_full_check_says_how_to_run_the_cpu_part(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--out",
                           str(tmp_path)], cwd=ROOT, env=cli_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpu --quick" in proc.stderr
