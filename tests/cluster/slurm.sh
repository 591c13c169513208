#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (127.0.0.1) for the cluster tests and CI.
#   bash tests/cluster/slurm.sh start|stop|status
# start installs slurmctld, slurmd, slurm-client and munge when missing (Debian, needs root),
# writes /etc/slurm/slurm.conf and gres.conf (two fake GPUs), and starts munged, slurmctld and
# slurmd in the background; it returns once the node is idle. Both are idempotent. All state
# (munge key and socket, spool, logs, PID files, fake GPU device nodes) is under $STATE.
set -euo pipefail

STATE=${SNAKETUNE_SLURM_STATE:-/tmp/snaketune-slurm}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
HOST=$(hostname -s)
DAEMONS=(slurmd slurmctld munged) # stop order

log() { echo "slurm.sh: $*" >&2; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local cpus mem_mb file
    for file in "$CONF" "$GRES_CONF"; do # never overwrite a real cluster's configuration
        if [[ -f $file ]] && ! grep -q "^# Written by tests/cluster/slurm.sh" "$file"; then
            log "$file exists and was not written by this script; leaving it alone"
            return 1
        fi
    done
    cpus=$(nproc)
    # A bit under the machine's memory, so that slurmd's own measurement is never below it.
    mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE"/{munge,spool/ctld,spool/d,log,run,dev}
    chmod 755 "$STATE/munge"
    for i in 0 1; do
        [[ -c $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3 # fake GPUs: like /dev/null
    done
    cat >"$CONF" <<CONF
# Written by tests/cluster/slurm.sh: one node on 127.0.0.1, no accounting storage.
ClusterName=snaketune
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol this long (the status checks use squeue).
MinJobAge=600
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    {
        echo "# Written by tests/cluster/slurm.sh: two fake GPUs (character devices like /dev/null)."
        for i in 0 1; do echo "NodeName=$HOST Name=gpu File=$STATE/dev/gpu$i"; done
    } >"$GRES_CONF"
}

pid_of() { cat "$STATE/run/$1.pid" 2>/dev/null || true; }
alive() { local pid; pid=$(pid_of "$1"); [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

node_state() { sinfo --noheader --nodes="$HOST" --format=%T 2>/dev/null || true; }

status() {
    for daemon in "${DAEMONS[@]}"; do
        alive "$daemon" || { log "$daemon is not running"; return 1; }
    done
    local state
    state=$(node_state)
    case $state in
    idle* | mixed* | allocated* | completing*) echo "node $HOST: $state" ;;
    *) log "node $HOST is '${state:-unreachable}'"; return 1 ;;
    esac
}

start_daemon() { # name, command...: runs in the background, detached, logging under $STATE/log
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.log" 2>&1 &
    echo $! >"$STATE/run/$name.pid"
}

start() {
    if status >/dev/null 2>&1; then
        status
        return
    fi
    stop
    install_packages
    write_config
    [[ -s $STATE/munge/munge.key ]] || {
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    }
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    start_daemon slurmctld slurmctld -D -i
    start_daemon slurmd slurmd -D
    for _ in $(seq 60); do
        [[ $(node_state) == idle* ]] && status && return
        for daemon in "${DAEMONS[@]}"; do alive "$daemon" || break 2; done
        sleep 1
    done
    log "the node did not come up; the daemons' logs ($STATE/log):"
    tail -n 20 "$STATE"/log/*.log >&2
    stop
    return 1
}

stop() {
    local daemon pid
    for daemon in "${DAEMONS[@]}"; do
        pid=$(pid_of "$daemon")
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$STATE/run/$daemon.pid"
    done
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
