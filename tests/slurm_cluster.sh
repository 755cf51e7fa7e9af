#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests: `slurm_cluster.sh start DIR` / `stop DIR`.
#
# Everything (config, munge key and socket, state, logs, pid files) lives under DIR, so the
# system's /etc/slurm and /etc/munge are left alone and `stop` leaves nothing running.
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf (printed by `start` as an env line).
# Needs root and Debian's packages: slurmctld slurmd slurm-client munge (`install` gets them).
set -euo pipefail

cmd=${1:?usage: slurm_cluster.sh install|start|stop DIR}
dir=${2:-}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=${SLURM_TEST_CPUS:-2}
    mem=${SLURM_TEST_MEMORY_MB:-4096}
    mkdir -p "$dir"/{state,spool,log}
    # cred_expire bounds how long a requeued job waits before it may start again (default 120 s);
    # sched_interval and batch_sched_delay make the scheduler act within a second or two.
    cat >"$dir/slurm.conf" <<EOF
ClusterName=cliphvt
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURM_TEST_CTLD_PORT:-6817}
SlurmdPort=${SLURM_TEST_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
DefMemPerCPU=1024
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,batch_sched_delay=1,sched_min_interval=100000
KillWait=10
MinJobAge=300
JobRequeue=1
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "CgroupPlugin=cgroup/v1" >"$dir/cgroup.conf"
}

start_munge() {
    if [ ! -s "$dir/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    fi
    chmod 755 "$dir"  # munged needs the socket directory traversable by clients
    chmod 600 "$dir/munge.key"
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"
}

wait_idle() {
    local state
    for _ in $(seq 1 60); do
        state=$(SLURM_CONF="$dir/slurm.conf" sinfo -h -o %T 2>/dev/null || true)
        if [ "$state" = "idle" ]; then
            return 0
        fi
        sleep 0.5
    done
    echo "slurm node did not become idle (state: '${state:-none}'); logs in $dir/log" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

start() {
    install_packages
    write_config
    start_munge
    slurmctld -f "$dir/slurm.conf" -i
    slurmd -f "$dir/slurm.conf"
    wait_idle
    echo "SLURM_CONF=$dir/slurm.conf"
}

stop_pidfile() {
    local pidfile=$1 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    # Jobs first, so no job step outlives the daemons; then slurmd, slurmctld, munged.
    SLURM_CONF="$dir/slurm.conf" scancel --full --signal=KILL --user=root 2>/dev/null || true
    SLURM_CONF="$dir/slurm.conf" scancel --user=root 2>/dev/null || true
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
}

case $cmd in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: slurm_cluster.sh install|start|stop DIR" >&2; exit 2 ;;
esac
