#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (127.0.0.1), to try launch/slurm/*.sbatch locally and
# to run tests/test_launch.py against real daemons. Debian/Ubuntu, as root:
#
#     bash launch/slurm/local_cluster.sh        # install if needed, start, wait for an idle node
#     sbatch -n1 --wrap hostname && squeue      # then use it like any cluster
#
# Idempotent: installed packages are not reinstalled, running daemons are not started twice, and
# an /etc/slurm/slurm.conf that this script did not write is never overwritten.
# LOCAL_SLURM_CPUS sets the CPUs the node advertises (default: the machine's, at least 2, so that
# a job can run two training processes even on a one-core machine).
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
MARKER="# written by launch/slurm/local_cluster.sh"
NODE_NAME="$(hostname -s)"
CPUS="${LOCAL_SLURM_CPUS:-$(( $(nproc) > 2 ? $(nproc) : 2 ))}"
LOG_DIR=/var/log/slurm

log() { printf 'local_cluster: %s\n' "$*"; }

if [[ $EUID -ne 0 ]]; then
  log "must run as root (it installs packages and starts munged, slurmctld and slurmd)" >&2
  exit 1
fi

# --- packages ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Their post-install scripts try to start services; without systemd that fails harmlessly
  # and the daemons are started below instead.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# --- munge: the authentication every Slurm RPC carries ------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null

# --- name resolution: jobs reach the node (and training processes the rendezvous) by its name -----
if ! getent hosts "$NODE_NAME" >/dev/null; then
  log "adding '127.0.0.1 $NODE_NAME' to /etc/hosts"
  echo "127.0.0.1 $NODE_NAME" >>/etc/hosts
fi

# --- slurm.conf ---------------------------------------------------------------------------------
write_conf() {
  cat <<CONF
$MARKER
# One node on 127.0.0.1. linuxproc/none plugins: no cgroups needed (containers, VMs, CI).
ClusterName=local
SlurmctldHost=${NODE_NAME}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults: 60 s, backfill 30 s): a requeued job whose
# begin time has come starts at once on this one-node cluster.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
# Allow CPUs= below to differ from what slurmd detects.
SlurmdParameters=config_overrides
# Keep finished jobs visible to 'scontrol show job' for 10 minutes (there is no accounting DB).
MinJobAge=600
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurm/ctld
SlurmdSpoolDir=/var/spool/slurm/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${NODE_NAME} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

mkdir -p /etc/slurm /var/spool/slurm/ctld /var/spool/slurm/d "$LOG_DIR"
if [[ -f $SLURM_CONF ]] && ! grep -qxF "$MARKER" "$SLURM_CONF"; then
  log "$SLURM_CONF exists and was not written by this script: leaving it as it is"
else
  new_conf="$(write_conf)"
  if [[ ! -f $SLURM_CONF ]] || [[ "$(cat "$SLURM_CONF")" != "$new_conf" ]]; then
    log "writing $SLURM_CONF (node $NODE_NAME, $CPUS CPUs)"
    printf '%s\n' "$new_conf" >"$SLURM_CONF"
    if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; fi
  fi
fi

# --- daemons ------------------------------------------------------------------------------------
if ! pgrep -x slurmctld >/dev/null; then
  log "starting slurmctld"
  slurmctld
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! pgrep -x slurmd >/dev/null; then
  log "starting slurmd"
  slurmd
fi

# --- wait for the node --------------------------------------------------------------------------
state=""
for _ in $(seq 120); do
  state="$(sinfo -h -N -n "$NODE_NAME" -o %t 2>/dev/null || true)"
  case "$state" in
    idle|mix|alloc) break ;;
    # A node left down/drained by an earlier, interrupted session: put it back in service.
    down*|drain*|drng*) scontrol update nodename="$NODE_NAME" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mix|alloc) log "node $NODE_NAME is $state"; sinfo ;;
  *) log "node $NODE_NAME did not become idle (state '$state'); see $LOG_DIR/" >&2; exit 1 ;;
esac
