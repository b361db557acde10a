#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py: slurmctld and slurmd on
# localhost, munge authentication, select/cons_tres, no accounting (status from squeue; finished
# jobs stay visible for MinJobAge=600 s), and two GPUs as generic resources backed by two
# character devices (gres.conf), so that `sbatch --gpus=1` is accepted and SLURM sets
# CUDA_VISIBLE_DEVICES in the job (with plain files it accepts --gpus but sets no device).
#
# Run as root (installs slurm-wlm and munge with apt-get if they are missing). Idempotent: a
# cluster that answers is left as it is. Stop it with tests/slurm/stop-cluster.sh.
#
# The node declares CPUS and MEMORY_MB (defaults 16 CPUs, 64000 MB, whatever this machine has;
# `SlurmdParameters=config_overrides`) so that the requests of profiles/slurm fit unchanged; SLURM
# enforces neither here (no cgroups), and jobs share the real cores.
set -euo pipefail

STATE=${SAFEMETA_SLURM_STATE:-/var/tmp/safemeta-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# safemeta local test cluster (tests/slurm/start-cluster.sh)"
CPUS=${CPUS:-16}
MEMORY_MB=${MEMORY_MB:-64000}
HOST=$(hostname -s)
here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "start-cluster.sh: run as root (it starts munged, slurmctld and slurmd)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

if [ -e "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
  echo "start-cluster.sh: $CONF exists and was not written by this script; not touching it" >&2
  exit 1
fi

if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  echo "the local SLURM cluster is already running (node $HOST: $(sinfo -h -o '%t %c CPUs %G'))"
  echo "stop it with: $here/stop-cluster.sh"
  exit 0
fi

mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
for i in 0 1; do  # character devices (as /dev/null) standing in for /dev/nvidia0, /dev/nvidia1
  [ -c "$STATE/gpu$i" ] || { rm -f "$STATE/gpu$i"; mknod "$STATE/gpu$i" c 1 3; }
done
cat > "$CONF" <<EOF
$MARKER
ClusterName=safemeta-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/gres.conf <<EOF
$MARKER
NodeName=$HOST Name=gpu File=$STATE/gpu[0-1]
EOF

# munge: its own user, key and socket directory (the package created the key).
mkdir -p /run/munge
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- munged
  touch "$STATE/munged.ours"  # stop-cluster.sh stops munged only if it was started here
fi

start() {  # daemon, pid file: start unless the pid file names a live process
  if [ -s "$2" ] && kill -0 "$(cat "$2")" 2>/dev/null; then
    return
  fi
  "$1"
}
start slurmctld "$STATE/slurmctld.pid"
start slurmd "$STATE/slurmd.pid"

for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "local SLURM cluster up: node $HOST, partition debug, $(sinfo -h -o '%c CPUs, %m MB, %G')"
    echo "logs and state in $STATE; stop it with: $here/stop-cluster.sh"
    exit 0
  fi
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "start-cluster.sh: the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
sinfo -R >&2 || true
exit 1
