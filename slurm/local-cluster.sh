#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (munge + slurmctld + slurmd from the Debian
# packages slurm-wlm and munge), for the test tier tests/slurm and for trying the sbatch templates.
#
#   sudo slurm/local-cluster.sh install   # apt-get install slurm-wlm munge (once)
#   sudo slurm/local-cluster.sh start     # writes /etc/slurm/slurm.conf, starts the daemons, waits for idle
#   slurm/local-cluster.sh status         # sinfo
#   sudo slurm/local-cluster.sh stop      # stops the daemons this script started (by their pid files)
#
# Runs as root (slurmd must). The state lives in $PIPELINE_SLURM_STATE (default /tmp/pipeline-slurm);
# partition `debug` holds this one node with all its CPUs. There is no accounting daemon: use
# `scontrol show job` (sacct does not work). Not for production clusters.
set -euo pipefail

STATE=${PIPELINE_SLURM_STATE:-/tmp/pipeline-slurm}
CONF=/etc/slurm/slurm.conf

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        echo "slurm and munge are installed"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave 2 GiB to the OS; Slurm refuses a node that reports less memory than configured.
    mem_mb=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048))
    mkdir -p /etc/slurm "$STATE"/{state,spool,log}
    cat >"$CONF" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to scontrol show job (pipeline submit slurm --wait reads it) for 10 min.
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install
    write_conf
    if [[ ! -f /etc/munge/munge.key ]]; then
        /usr/sbin/mungekey -c
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    if ! running /run/munge/munged.pid; then
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    running "$STATE/slurmctld.pid" || slurmctld
    running "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            sinfo
            return
        fi
        # A node left DOWN by an earlier run of the daemons comes back with RESUME.
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "slurm did not come up; see $STATE/log/" >&2
    exit 1
}

stop() {
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
        fi
    done
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop ;;
status) sinfo ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
