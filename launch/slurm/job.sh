#!/usr/bin/env bash
# The body of every sbatch script in this folder (single_node.sbatch, multi_node.sbatch exec it,
# keeping the batch shell's PID, so Slurm's `--signal=B:USR1` reaches the trap below).
# Expects ACCELERATE_CONFIG; see the sbatch scripts for the arguments and environment.
set -uo pipefail  # no -e: the training step's exit status is examined, not fatal

if (( $# < 1 )) || [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "usage: sbatch [sbatch options] launch/slurm/SCRIPT.sbatch CONFIG.yaml [key=value ...]" >&2
  exit 2
fi

export PROJECT_DIR="${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$PROJECT_DIR" || exit 2
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON="$PROJECT_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
export LAUNCHER="${LAUNCHER:-accelerate}"
gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
# Rank 0's node hosts the rendezvous; the port comes from the job id, so that two jobs sharing a
# node do not collide, and a requeued job (same id) uses the same one.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
export MASTER_ADDR MASTER_PORT

echo "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} node(s)" \
     "x ${NPROC_PER_NODE} process(es), ${LAUNCHER}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

# Run by srun on every node. Single quotes: SLURM_NODEID must be expanded on each node, not
# here (here it is always 0, and every node would claim rank 0).
# `trap "" USR1` makes the launcher ignore USR1 (it would otherwise die of it, and the step's
# end would kill the training processes mid-checkpoint); the training processes install their
# own handler, so they still get it.
# shellcheck disable=SC2016  # expanded on each node, see above
node_command='
trap "" USR1
if [[ $LAUNCHER == torchrun ]]; then
  exec "$PYTHON" -m train.launch \
    --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m train "$@"
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
  --num_processes "$(( SLURM_NNODES * NPROC_PER_NODE ))" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m train "$@"
'

stop_requested=0
step_pid=""
# shellcheck disable=SC2317  # called by the trap
forward_stop() {
  stop_requested=1
  echo "job ${SLURM_JOB_ID}: USR1 received, asking the training processes to checkpoint and stop"
  # srun passes the signal on to every process of the step, on every node.
  [[ -n $step_pid ]] && kill -USR1 "$step_pid" 2>/dev/null
}
trap forward_stop USR1

# srun does not inherit --cpus-per-task from sbatch in Slurm 22.05+, hence the explicit flag.
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  --kill-on-bad-exit=1 bash -c "$node_command" launch_on_node "$@" &
step_pid=$!

# A trapped signal interrupts `wait`; keep waiting until the step has really ended.
status=0
wait "$step_pid" || status=$?
while kill -0 "$step_pid" 2>/dev/null; do
  status=0
  wait "$step_pid" || status=$?
done

# 3: the training processes stopped on a signal with a complete checkpoint (train.launch
# reports it for torchrun; a USR1 that reached them some other way counts too).
if (( stop_requested || status == 3 )); then
  # A job-array task requeues only itself, not the whole array.
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    target="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    target="$SLURM_JOB_ID"
  fi
  echo "job ${SLURM_JOB_ID}: training exited with status ${status} after the stop request;" \
       "requeueing ${target} (it resumes from the latest checkpoint)"
  scontrol requeue "$target"
  exit 0
fi
echo "job ${SLURM_JOB_ID}: training exited with status ${status}"
exit "$status"
