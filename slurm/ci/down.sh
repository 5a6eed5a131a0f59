#!/usr/bin/env bash
# down.sh - stop the Slurm cluster started by slurm/ci/up.sh.
# Cancels all jobs, then stops slurmd, slurmctld, slurmdbd, mariadbd, munged,
# each by the PID in its own PID file (checked against the expected command name).
#   SLURM_CI_ROOT   working dir [/tmp/megatron-elastic-slurm]
#   SLURM_CI_PURGE  1 = also delete state, spool, DB data, key, configs (keeps log/) [0]
set -uo pipefail

ROOT=${SLURM_CI_ROOT:-/tmp/megatron-elastic-slurm}
export SLURM_CONF=$ROOT/etc/slurm.conf
log() { echo "[slurm/ci/down.sh $(date +%T)] $*"; }

alive() {  # running and not a zombie
  kill -0 "$1" 2>/dev/null || return 1
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
stop_pidfile() {  # stop_pidfile <pidfile> <expected comm prefix>
  local pf=$1 name=$2 pid comm
  [ -f "$pf" ] || return 0
  pid=$(cat "$pf" 2>/dev/null)
  if [ -z "$pid" ] || ! alive "$pid"; then rm -f "$pf"; return 0; fi
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  case "$comm" in
    "$name"*) ;;
    *) log "pid $pid from $pf is '$comm', not $name: leaving it alone"; rm -f "$pf"; return 0 ;;
  esac
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then log "$name did not stop, SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
  rm -f "$pf"
}

# 1. cancel all jobs while slurmctld/slurmd are still there, so slurmstepd's exit cleanly
if [ -f "$SLURM_CONF" ] && [ -f "$ROOT/run/slurmctld.pid" ] && timeout 10 scontrol ping >/dev/null 2>&1; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    log "cancelling jobs: $jobs"
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 50); do [ -z "$(timeout 5 squeue -h -t R,CG,PD -o %i 2>/dev/null)" ] && break; sleep 0.3; done
  fi
fi

# 2. daemons, in reverse start order
for pf in "$ROOT"/run/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf" slurmd; done
stop_pidfile "$ROOT/run/slurmctld.pid"  slurmctld
stop_pidfile "$ROOT/run/slurmdbd.pid"   slurmdbd
stop_pidfile "$ROOT/mysql/mysqld.pid"   mariadbd
stop_pidfile "$ROOT/munge/munged.pid"   munged
rm -f "$ROOT/munge/munge.socket.2" "$ROOT/munge/munge.socket.2.lock" "$ROOT/mysql/mysqld.sock"

if [ "${SLURM_CI_PURGE:-0}" = 1 ]; then
  log "purging state under $ROOT"
  rm -rf "$ROOT"/{state,spool,run,mysql,munge,etc,fakegpu} "$ROOT/slurm.env"
fi
log "down"
