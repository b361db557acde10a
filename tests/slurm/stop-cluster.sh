#!/usr/bin/env bash
# Stop the cluster of tests/slurm/start-cluster.sh: slurmd, slurmctld and munged, each by the
# process id in its pid file. The config (/etc/slurm/*.conf) and state directory stay, so a
# later start-cluster.sh is quick.
set -uo pipefail

STATE=${SAFEMETA_SLURM_STATE:-/var/tmp/safemeta-slurm}

stop() {  # name, pid file
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    echo "stopped $1 (pid $pid)"
  fi
}
stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
if [ -e "$STATE/munged.ours" ]; then
  stop munged /run/munge/munged.pid
  rm -f "$STATE/munged.ours"
fi
