#!/usr/bin/env bash
# up.sh - bring up a real Slurm cluster on loopback (one machine, optionally several emulated
# nodes) for the project's Slurm tests: `bash slurm/ci/up.sh`, then `bash slurm/ci/down.sh`.
#
# Runs as root. No systemd and no cgroups needed. Everything (configs, state, logs,
# sockets, pid files, DB) lives under $SLURM_CI_ROOT. Idempotent: if the cluster
# is already healthy it does nothing; otherwise it stops whatever is left and starts it again.
#
# Daemons: munged (own socket + key), mariadbd (127.0.0.1:13306) + slurmdbd (:6819)
# so that sacct works (submitit needs sacct), slurmctld (:6817), slurmd (:6818).
#
# Knobs (environment variables):
#   SLURM_CI_ROOT        working dir                                   [/tmp/megatron-elastic-slurm]
#   SLURM_CI_ACCOUNTING  1 = slurmdbd+MariaDB (sacct works), 0 = none  [1]
#   SLURM_CI_CPUS        CPUs advertised per node (may exceed nproc)    [4]
#   SLURM_CI_GPUS        fake GPUs per node (gres/gpu on /dev/null clones: Slurm
#                        schedules them and sets CUDA_VISIBLE_DEVICES; no CUDA) [2]
#   SLURM_CI_MEM_MB      RealMemory advertised per node, MB             [8000]
#   SLURM_CI_NODES       number of emulated nodes; 1 = node named $(hostname -s),
#                        N>1 = nodes n1..nN, one slurmd each, all on 127.0.0.1 [2]
#                        (the names do not resolve; NodeAddr in `scontrol show node`
#                        does, which is what megatron_elastic.slurm.env uses)
#   SLURM_CI_PARTITION   name of the (default) partition               [debug]
#   SLURM_CI_FEATURES    node features for --constraint, e.g. "h100,ib"  []
#   SLURM_CI_REQUEUE_DELAY  seconds a requeued job waits before it may start again
#                        (AuthInfo cred_expire; Slurm's default is 120)  [5]
#   SLURM_CI_INSTALL     1 = apt-get install missing packages          [1]
#
# Afterwards:  source "$SLURM_CI_ROOT/slurm.env"   (exports SLURM_CONF)
set -euo pipefail

ROOT=${SLURM_CI_ROOT:-/tmp/megatron-elastic-slurm}
ACCT=${SLURM_CI_ACCOUNTING:-1}
NCPUS=${SLURM_CI_CPUS:-4}
NGPUS=${SLURM_CI_GPUS:-2}
MEM_MB=${SLURM_CI_MEM_MB:-8000}
NNODES=${SLURM_CI_NODES:-2}
PARTITION=${SLURM_CI_PARTITION:-debug}
FEATURES=${SLURM_CI_FEATURES:-}
REQUEUE_DELAY=${SLURM_CI_REQUEUE_DELAY:-5}
INSTALL=${SLURM_CI_INSTALL:-1}
HOST=$(hostname -s 2>/dev/null || cut -d. -f1 /proc/sys/kernel/hostname)
if [ "$NNODES" -gt 1 ]; then
  NODES=$(seq -f 'n%g' 1 "$NNODES"); NODESPEC="n[1-$NNODES]"
  NODEADDR="NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[6821-$((6820 + NNODES))]"
else
  NODES=$HOST; NODESPEC=$HOST; NODEADDR="NodeAddr=127.0.0.1 Port=6818"
fi
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819 DB_PORT=13306
MUNGE_SOCK=$ROOT/munge/munge.socket.2
DB_SOCK=$ROOT/mysql/mysqld.sock
export SLURM_CONF=$ROOT/etc/slurm.conf
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "[slurm/ci/up.sh $(date +%T)] $*"; }
die() { echo "[slurm/ci/up.sh] ERROR: $*" >&2; for f in "$ROOT"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done; exit 1; }
wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && die "timed out after ${t}s waiting for $what"
    sleep 0.3
  done
}
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
nodes_up() {  # every node registered and usable
  [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated|completing)$')" -eq "$NNODES" ]
}

# ---------------------------------------------------------------- 0. healthy already?
KNOBS="acct=$ACCT cpus=$NCPUS gpus=$NGPUS mem=$MEM_MB nodes=$NNODES part=$PARTITION feat=$FEATURES requeue=$REQUEUE_DELAY sched=1 root=$ROOT"
healthy() {
  [ "$(cat "$ROOT/run/knobs" 2>/dev/null)" = "$KNOBS" ] || return 1   # same settings as last time?
  for p in munge/munged.pid run/slurmctld.pid; do pid_alive "$ROOT/$p" || return 1; done
  for n in $NODES; do pid_alive "$ROOT/run/slurmd-$n.pid" || return 1; done
  if [ "$ACCT" = 1 ]; then
    pid_alive "$ROOT/mysql/mysqld.pid" && pid_alive "$ROOT/run/slurmdbd.pid" || return 1
    sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw ci || return 1
  fi
  for _ in $(seq 1 50); do nodes_up && return 0; sleep 0.3; done   # e.g. a job still completing
  return 1
}
if [ -f "$SLURM_CONF" ] && healthy; then
  log "cluster already up and healthy (SLURM_CONF=$SLURM_CONF)"; exit 0
fi
# Anything half-up from a previous run: stop it (by PID files only).
SLURM_CI_ROOT=$ROOT bash "$HERE/down.sh" >/dev/null 2>&1 || true

# ---------------------------------------------------------------- 1. packages
PKGS="munge slurmctld slurmd slurm-client"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  [ "$INSTALL" = 1 ] || die "missing packages:$missing"
  log "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # On hosts with systemd the packaged munge/mariadb services may start on their default
  # socket/port (slurm units need /etc/slurm/*.conf); they do not clash with ours.
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# ---------------------------------------------------------------- 2. dirs + configs
mkdir -p "$ROOT"/{etc,munge,state,spool,log,run,mysql}
chmod 755 "$ROOT" "$ROOT/munge"

if [ ! -s "$ROOT/munge/munge.key" ]; then
  dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$ROOT/munge/munge.key"

GRES_LINE="" NODE_GRES=""
if [ "$NGPUS" -gt 0 ]; then
  # Fake GPUs: slurmd only wants character devices; use /dev/null clones.
  mkdir -p "$ROOT/fakegpu"
  for i in $(seq 0 $((NGPUS - 1))); do
    [ -c "$ROOT/fakegpu/nvidia$i" ] || mknod "$ROOT/fakegpu/nvidia$i" c 1 3
  done
  echo "NodeName=$NODESPEC Name=gpu File=$ROOT/fakegpu/nvidia[0-$((NGPUS - 1))]" > "$ROOT/etc/gres.conf"
  GRES_LINE="GresTypes=gpu"
  NODE_GRES="Gres=gpu:$NGPUS"
else
  rm -f "$ROOT/etc/gres.conf"
fi

if [ "$ACCT" = 1 ]; then
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_CONF="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

cat > "$ROOT/etc/slurm.conf" <<EOF
# generated by slurm/ci/up.sh
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$REQUEUE_DELAY
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
# no cgroups, no systemd needed:
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval/bf_interval: start requeued jobs (and jobs whose begin time has come) within a second or two
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
MpiDefault=none
SwitchType=switch/none
$ACCT_CONF
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
$GRES_LINE
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName=$NODESPEC $NODEADDR CPUs=$NCPUS Sockets=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=$MEM_MB $NODE_GRES ${FEATURES:+Features=$FEATURES} State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

cat > "$ROOT/slurm.env" <<EOF
export SLURM_CONF=$SLURM_CONF
EOF

# ---------------------------------------------------------------- 3. munged
log "starting munged"
munged --socket="$MUNGE_SOCK" --key-file="$ROOT/munge/munge.key" \
       --pid-file="$ROOT/munge/munged.pid" --seed-file="$ROOT/munge/munged.seed" \
       --log-file="$ROOT/log/munged.log"
wait_for 20 munged bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'"

# ---------------------------------------------------------------- 4. MariaDB + slurmdbd
if [ "$ACCT" = 1 ]; then
  if [ ! -d "$ROOT/mysql/data/mysql" ]; then
    log "initialising MariaDB datadir"
    mariadb-install-db --no-defaults --user=root --datadir="$ROOT/mysql/data" \
      --auth-root-authentication-method=normal --skip-test-db > "$ROOT/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed"
  fi
  log "starting mariadbd"
  # nohup + setsid: fully detached from the CI shell; mariadbd writes its own pid file.
  setsid nohup mariadbd --no-defaults --user=root --datadir="$ROOT/mysql/data" \
    --socket="$DB_SOCK" --pid-file="$ROOT/mysql/mysqld.pid" \
    --bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    --log-error="$ROOT/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadbd mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping
  wait_for 10 "mariadbd pid file" test -s "$ROOT/mysql/mysqld.pid"
  mariadb --no-defaults --socket="$DB_SOCK" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "creating DB user failed"

  cat > "$ROOT/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ROOT/etc/slurmdbd.conf"   # holds the DB password; slurmdbd wants it 0600
  log "starting slurmdbd"
  slurmdbd   # finds slurmdbd.conf next to $SLURM_CONF, daemonises
  wait_for 60 slurmdbd sacctmgr -n list cluster
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
log "starting slurmctld"
slurmctld -i          # -i: ignore unreadable state files from a previous run
wait_for 30 slurmctld scontrol ping
for n in $NODES; do log "starting slurmd for node $n"; slurmd -N "$n"; done
wait_for 60 "$NNODES node(s) to become idle" nodes_up
if [ "$ACCT" = 1 ]; then
  # slurmctld registers cluster "ci" in slurmdbd by itself on first contact
  wait_for 30 "cluster registration in slurmdbd" bash -c "sacctmgr -n list cluster format=cluster | grep -qw ci"
fi
echo "$KNOBS" > "$ROOT/run/knobs"
sinfo
log "cluster up. Use: source $ROOT/slurm.env"
