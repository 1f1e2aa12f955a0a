#!/usr/bin/env bash
# A one-node Slurm on this machine, for tests/test_slurm.py (CI runs it from .ci/run).
#
#   bash .ci/slurm.sh start    install Debian's Slurm and MUNGE if missing (and shellcheck, which
#                              the same tests run on the scripts), configure one node
#                              (this host, all its CPUs, no GPUs), start munged, slurmctld and
#                              slurmd, wait until the node is idle
#   bash .ci/slurm.sh stop     cancel the jobs left, stop the daemons it started
#   bash .ci/slurm.sh status   what runs, and sinfo
#
# Both are idempotent: `start` with Slurm up only waits for the node, `stop` with nothing up
# says so. Needs root and Debian/Ubuntu's packages (slurmctld, slurmd, slurm-client, munge); no
# systemd: the daemons are started directly. No cgroups either: processes are tracked through
# /proc (proctrack/linuxproc) and tasks are not bound (task/none).
#
# It writes /etc/slurm/slurm.conf (where the commands look for it) and refuses to replace one it
# did not write; the daemons' state, spool and logs go under $RETINAPERF_SLURM_ROOT
# (default /var/tmp/retinaperf-slurm).
set -euo pipefail

ROOT=${RETINAPERF_SLURM_ROOT:-/var/tmp/retinaperf-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# Written by retinaperf's .ci/slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge shellcheck)
NODE=$(hostname -s)
WAIT_S=60

say() { echo "slurm.sh: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

installed() {
    local package
    for package in "${PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f '${Status}' "$package" 2>/dev/null)" = "install ok installed" ] ||
            return 1
    done
}

install_packages() {
    installed && return 0
    command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} yourself"
    [ "$(id -u)" -eq 0 ] || die "installing ${PACKAGES[*]} needs root"
    say "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # The packages' scripts try to start the services; without systemd that fails harmlessly.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null ||
        die "apt-get install ${PACKAGES[*]} failed"
}

# The pid in a pid file, if that process is alive.
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged answers already (ours, or the system's)
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile /etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start: see /var/log/munge/munged.log"
    mkdir -p "$ROOT"
    touch "$ROOT/munged.started" # `stop` stops the munged this script started, no other
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged started but does not answer: see /var/log/munge/munged.log"
}

write_conf() {
    local cpus mem_mib conf
    cpus=$(nproc) # the CPUs this machine lets us use (affinity, container limits)
    # Slurm drains a node that has less memory than configured: stay 10 % under the total.
    mem_mib=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    conf=$(
        cat <<EOF
$MARK: a one-node cluster for tests/test_slurm.py.
ClusterName=retinaperf-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/ctld
SlurmdSpoolDir=$ROOT/d
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
# No cgroups in a container: processes are found through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The node is what this file says, whatever slurmd detects (sockets, cores).
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# A node that was down comes back by itself; jobs may be requeued (scontrol requeue, --requeue).
ReturnToService=2
JobRequeue=1
# KillWait (SIGTERM to SIGKILL when a job is cancelled, requeued or preempted) is left at its
# default, 30 s, as on most clusters.
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    )
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: not replacing it (a Slurm of this" \
            "machine's own?); move it aside to use this one"
    fi
    if [ "$(cat "$CONF" 2>/dev/null)" != "$conf" ]; then
        mkdir -p "$(dirname "$CONF")"
        printf '%s\n' "$conf" >"$CONF"
        say "wrote $CONF (node $NODE: $cpus CPUs, $mem_mib MiB)"
    fi
}

# (Outputs are read whole, not piped to `grep -q` or `head`: under pipefail a writer cut off by
# SIGPIPE would fail the pipeline.)
controller_answers() {
    [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]]
}

node_state() {
    sinfo -h -N -n "$NODE" -o %t 2>/dev/null | sed -n 1p
}

start() {
    [ "$(id -u)" -eq 0 ] || die "start needs root (it installs packages and starts daemons)"
    install_packages
    # Jobs reach the node by its name (torchrun's rendezvous on the first node of the job).
    getent hosts "$NODE" >/dev/null ||
        die "this host's name, $NODE, does not resolve: add '127.0.0.1 $NODE' to /etc/hosts"
    write_conf
    mkdir -p "$ROOT/ctld" "$ROOT/d" "$ROOT/log"
    start_munge
    if ! alive "$ROOT/slurmctld.pid" >/dev/null; then
        slurmctld || die "slurmctld did not start: see $ROOT/log/slurmctld.log"
    fi
    if ! alive "$ROOT/slurmd.pid" >/dev/null; then
        slurmd || die "slurmd did not start: see $ROOT/log/slurmd.log"
    fi
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        if controller_answers; then
            state=$(node_state)
            case "$state" in
            idle | mix | alloc) break ;;
            # Left drained or down by an earlier start (a changed node, a killed slurmd).
            drain* | down* | drng*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
            esac
        fi
        sleep 0.5
    done
    case "$state" in
    idle | mix | alloc) ;;
    *)
        controller_answers || die "slurmctld does not answer after ${WAIT_S} s: see" \
            "$ROOT/log/slurmctld.log"
        die "node $NODE is '${state:-unknown}' after ${WAIT_S} s, not idle: see" \
            "$ROOT/log/slurmd.log and 'scontrol show node $NODE'"
        ;;
    esac
    say "Slurm is up: node $NODE $state, partition ci (logs in $ROOT/log)"
    sinfo
}

stop_daemon() {
    local name=$1 pidfile=$2 pid
    if ! pid=$(alive "$pidfile"); then
        say "$name is not running"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || {
            say "stopped $name (pid $pid)"
            return 0
        }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "killed $name (pid $pid): it did not stop within 10 s of SIGTERM"
}

stop() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF was not written by this script: not stopping that Slurm"
    fi
    if controller_answers; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling the jobs left: $jobs"
            # shellcheck disable=SC2086 # one argument per job id
            scancel $jobs || true
            for _ in $(seq 100); do
                [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    stop_daemon slurmd "$ROOT/slurmd.pid"
    stop_daemon slurmctld "$ROOT/slurmctld.pid"
    if [ -e "$ROOT/munged.started" ]; then
        stop_daemon munged /run/munge/munged.pid
        rm -f "$ROOT/munged.started"
    fi
}

status() {
    local name pid
    for name in slurmctld slurmd; do
        if pid=$(alive "$ROOT/$name.pid"); then
            say "$name running (pid $pid)"
        else
            say "$name not running"
        fi
    done
    if controller_answers; then
        sinfo
    else
        say "slurmctld does not answer"
        return 1
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: bash .ci/slurm.sh start|stop|status" >&2
    exit 2
    ;;
esac
