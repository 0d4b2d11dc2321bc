#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine for tests/test_slurm.py: munge, slurmctld
# and slurmd, without accounting (job states come from squeue, so the test passes
# `--slurm-status-command squeue`). Installs Debian's packages first when they are missing.
# Needs root. Every daemon it starts is listed in $SRMIL_SLURM_DIR/pidfiles;
# .ci/slurm-stop.sh stops exactly those. Facts behind the settings: shared/design/slurm-local.md.
set -euo pipefail

dir=${SRMIL_SLURM_DIR:-/tmp/srmil-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by srmil .ci/slurm-start.sh"

if [ "$(id -u)" != 0 ]; then
    echo ".ci/slurm-start.sh: needs root (apt-get, munge and slurmd run as root)" >&2
    exit 1
fi

# A cluster that already answers (an earlier start, or a real one) is used as it is.
if sinfo -h >/dev/null 2>&1; then
    echo "slurm-start: a SLURM cluster already answers; using it"
    sinfo
    exit 0
fi

if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ] ||
    ! command -v sbatch >/dev/null; then
    echo "slurm-start: installing slurmctld slurmd slurm-client munge"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge
fi

if [ -e "$conf" ] && ! grep -qxF "$marker" "$conf"; then
    echo ".ci/slurm-start.sh: $conf exists and was not written by this script; not touching it" >&2
    exit 1
fi

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
: >"$dir/pidfiles"

# munge: reuse a running one (then it is not ours to stop).
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    echo /run/munge/munged.pid >>"$dir/pidfiles"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
munge -n | unmunge >/dev/null

node=$(hostname -s)
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
# `slurmd -C` describes this machine (CPUs, sockets, cores); keep 10% of the memory back.
node_line=$(/usr/sbin/slurmd -C | head -n 1 | sed "s/RealMemory=[0-9]*/RealMemory=$mem_mb/")
cat >"$conf" <<EOF
$marker
ClusterName=localcluster
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue must still see finished jobs when the executor asks (it polls every 2-40 s).
MinJobAge=300
$node_line State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

# -c: start from a clean state (no jobs left from an earlier run).
/usr/sbin/slurmctld -c
echo "$dir/slurmctld.pid" >>"$dir/pidfiles"
/usr/sbin/slurmd
echo "$dir/slurmd.pid" >>"$dir/pidfiles"

# Jobs submitted before the node reports idle can sit pending for a minute.
for _ in $(seq 120); do
    if [ "$(sinfo -h -N -o %t 2>/dev/null)" = idle ]; then
        sinfo
        exit 0
    fi
    sleep 0.5
done
echo ".ci/slurm-start.sh: the node did not become idle within 60 s; logs in $dir/log" >&2
sinfo >&2 || true
exit 1
