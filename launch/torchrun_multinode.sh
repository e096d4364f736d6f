#!/usr/bin/env bash
# Multi-node training without Slurm: run this once on every machine, with the same NNODES,
# MASTER_ADDR and MASTER_PORT everywhere and NODE_RANK = 0 .. NNODES-1 (0 on MASTER_ADDR's host).
#
#   # on 10.0.0.1                                   # on 10.0.0.2
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \      NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#     launch/torchrun_multinode.sh CONFIG.yaml ...    launch/torchrun_multinode.sh CONFIG.yaml ...
#
# Arguments: the run config and its dotted overrides, exactly as for `python -m train`.
# Environment:
#   NNODES, NODE_RANK, MASTER_ADDR   required
#   MASTER_PORT      default 29500; must be reachable on MASTER_ADDR from every machine
#   NPROC_PER_NODE   default: the number of GPUs (nvidia-smi), or 1 without GPUs
#   PYTHON           default: this checkout's .venv/bin/python if it exists, else python3
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, NCCL_IB_DISABLE, NCCL_DEBUG: see "Run on a cluster" in README.md
#
# output_dir must be on a filesystem every machine sees (NFS, Lustre, ...): checkpoints are
# written by all ranks into one directory.
set -euo pipefail

: "${NNODES:?set NNODES (number of machines)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1; 0 on MASTER_ADDR)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of the NODE_RANK=0 machine)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if (( $# < 1 )); then
  echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi

if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
if [[ -z ${PYTHON:-} ]]; then
  checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  PYTHON=python3
  if [[ -x $checkout/.venv/bin/python ]]; then PYTHON="$checkout/.venv/bin/python"; fi
fi

echo "node ${NODE_RANK}/${NNODES}: ${NPROC_PER_NODE} process(es)," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}" >&2
# exec: signals sent to this script (SIGTERM from a scheduler) reach torchrun, which passes
# them on to the training processes.
exec "$PYTHON" -m train.launch \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m train "$@"
