#!/usr/bin/env bash
# A single-node SLURM 22.05 cluster with accounting on this machine, without systemd (CI and laptops; Debian).
#   workflow/scripts/slurm-local.sh install   apt-get the daemons (root; about 35 s)
#   workflow/scripts/slurm-local.sh start     start munge, mariadb, slurmdbd, slurmctld, slurmd; wait for the node
#   workflow/scripts/slurm-local.sh stop      stop them by their pid files
# State, spool, logs and pid files live in $SLURM_LOCAL_DIR (default /tmp/slurm-local).
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
CLUSTER=evpretrain
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"

install() {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge slurmdbd mariadb-server
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,run} /etc/slurm
    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF
    chmod 600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a readable config
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"
    shift 2
    for _ in $(seq "$((seconds * 5))"); do
        if "$@" > /dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "slurm-local: $what did not come up within ${seconds}s (logs in $DIR/log)" >&2
    return 1
}

start() {
    write_config
    mkdir -p /run/munge && chown munge:munge /run/munge
    pgrep -x munged > /dev/null || su -s /bin/sh munge -c /usr/sbin/munged
    if ! pgrep -x mariadbd > /dev/null; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        setsid mariadbd --user=mysql > "$DIR/log/mariadb.log" 2>&1 < /dev/null &
        wait_for 30 mariadb mysqladmin ping
        mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    fi
    [ -f "$DIR/run/slurmdbd.pid" ] && kill -0 "$(cat "$DIR/run/slurmdbd.pid")" 2> /dev/null || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster "$CLUSTER" > /dev/null 2>&1 || true
    [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2> /dev/null || slurmctld
    [ -f "$DIR/run/slurmd.pid" ] && kill -0 "$(cat "$DIR/run/slurmd.pid")" 2> /dev/null || slurmd -N localhost
    wait_for 30 "the node" sh -c "sinfo -h -N -o %t | grep -Eq '^(idle|mix|alloc)'"
    echo "slurm-local: cluster $CLUSTER up ($CPUS CPUs, $MEM_MB MB), state in $DIR"
}

stop() {
    for daemon in slurmd slurmctld slurmdbd; do
        if [ -f "$DIR/run/$daemon.pid" ]; then kill "$(cat "$DIR/run/$daemon.pid")" 2> /dev/null || true; fi
    done
    pkill -x mariadbd 2> /dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
