#!/usr/bin/env bash
# One-node Slurm cluster on 127.0.0.1 for CI and tests/test_cluster.py: munged, MariaDB, slurmdbd (sacct
# needs it and submitit reads job states only from sacct), slurmctld, slurmd. Debian/Ubuntu, root.
#   bash slurm/ci-up.sh        install (if missing) and start; safe to re-run; waits until the node is up
#   bash slurm/ci-up.sh stop   stop the Slurm daemons and MariaDB (by pid file)
# Prints one line. Exit 0: up; 3: this machine cannot host it (not root, no apt, packages unavailable,
# or a slurm.conf this script did not write); 1: anything else (see the logs under $SLURM_CI_DIR/log).
# Env: SLURM_CI_DIR (state, logs; default /tmp/slurm-ci), SLURM_CI_DBPORT (MariaDB port; default 3307).
set -euo pipefail
B=${SLURM_CI_DIR:-/tmp/slurm-ci}
DBPORT=${SLURM_CI_DBPORT:-3307}
MARK="# written by vaejob slurm/ci-up.sh"
T0=$SECONDS

cannot() { echo "slurm: cannot start here: $*" >&2; exit 3; }
fail() { echo "slurm: failed: $* (logs: $B/log)" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -N -n localhost -o %t 2>/dev/null || true; }
# Poll a command for up to 60 s.
wait_for() {
  local _
  for _ in $(seq 120); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  fail "timed out waiting for: $1"
}

if [ "${1:-}" = stop ]; then # newest daemon first; a dead slurmd can look idle in sinfo, so use pid files
  for p in state/slurmd state/slurmctld state/slurmdbd dbrun/mysqld; do
    if alive "$B/$p.pid"; then
      pid=$(cat "$B/$p.pid")
      kill "$pid"
      wait_for "! kill -0 $pid"
    fi
  done
  echo "slurm: stopped"
  exit 0
fi

[ "$(id -u)" = 0 ] || cannot "needs root (it writes /etc/slurm and starts system daemons)"
if [ -e /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  cannot "/etc/slurm/slurm.conf exists and was not written by this script (a real cluster?)"
fi

need=(slurmctld slurmd slurmdbd sbatch sacct munged mungekey mariadbd mariadb-install-db)
missing() {
  local c
  for c in "${need[@]}"; do command -v "$c" >/dev/null || return 0; done
  return 1
}
if missing; then
  command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get"
  mkdir -p "$B/log"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client slurmdbd munge mariadb-server; } >"$B/log/apt.log" 2>&1 ||
    cannot "apt-get install failed (see $B/log/apt.log)"
  ! missing || cannot "packages installed but commands are missing: ${need[*]}"
fi

mkdir -p "$B"/state/ctld "$B"/state/d "$B"/log "$B"/db "$B"/dbrun /run/munge /etc/slurm
chown munge:munge /run/munge
chown mysql:mysql "$B"/db "$B"/dbrun # mariadbd runs as mysql and creates its socket there

if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
fi
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
wait_for "munge -n | unmunge"

[ -d "$B"/db/mysql ] || mariadb-install-db --user=mysql --datadir="$B"/db --skip-test-db \
  --auth-root-authentication-method=socket >"$B"/log/db-init.log 2>&1 || fail "mariadb-install-db"
if ! alive "$B"/dbrun/mysqld.pid; then
  setsid mariadbd --no-defaults --user=mysql --datadir="$B"/db --socket="$B"/dbrun/mysqld.sock \
    --pid-file="$B"/dbrun/mysqld.pid --bind-address=127.0.0.1 --port="$DBPORT" \
    --log-error="$B"/log/mariadb.err --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
fi
wait_for "mariadb-admin --socket=$B/dbrun/mysqld.sock ping"
mariadb --socket="$B"/dbrun/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

printf '%s\n' "$MARK" DbdHost=localhost SlurmUser=root "PidFile=$B/state/slurmdbd.pid" \
  "LogFile=$B/log/slurmdbd.log" StorageType=accounting_storage/mysql StorageHost=127.0.0.1 \
  "StoragePort=$DBPORT" StorageUser=slurm StoragePass=slurm StorageLoc=slurm_acct_db >"$B"/slurmdbd.conf
install -m 600 "$B"/slurmdbd.conf /etc/slurm/slurmdbd.conf # slurmdbd refuses a world-readable file

# cred_expire=10: a requeued job restarts after ~11 s instead of 120 s; bf/sched_interval: fast scheduling.
MEM=$(($(free -m | awk '/^Mem:/{print $2}') / 2))
printf '%s\n' "$MARK" ClusterName=ci SlurmctldHost=localhost AuthInfo=cred_expire=10 MailProg=/bin/true \
  CommunicationParameters=NoCtldInAddrAny,NoInAddrAny \
  "StateSaveLocation=$B/state/ctld" "SlurmdSpoolDir=$B/state/d" "SlurmctldPidFile=$B/state/slurmctld.pid" \
  "SlurmdPidFile=$B/state/slurmd.pid" "SlurmctldLogFile=$B/log/slurmctld.log" "SlurmdLogFile=$B/log/slurmd.log" \
  ProctrackType=proctrack/linuxproc TaskPlugin=task/none SelectType=select/cons_tres SelectTypeParameters=CR_Core \
  SchedulerType=sched/backfill SchedulerParameters=bf_interval=1,sched_interval=2 ReturnToService=2 \
  JobAcctGatherType=jobacct_gather/linux AccountingStorageType=accounting_storage/slurmdbd \
  AccountingStorageHost=localhost \
  "NodeName=localhost CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN" \
  "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP" >"$B"/slurm.conf
changed=0
cmp -s "$B"/slurm.conf /etc/slurm/slurm.conf || { install -m 644 "$B"/slurm.conf /etc/slurm/slurm.conf && changed=1; }

alive "$B"/state/slurmdbd.pid || slurmdbd
wait_for "sacctmgr -n show cluster"
if alive "$B"/state/slurmctld.pid; then
  [ "$changed" = 0 ] || scontrol reconfigure
else
  slurmctld
fi
wait_for "scontrol ping | grep -q UP"
alive "$B"/state/slurmd.pid || slurmd -N localhost # the node is declared as localhost, not the hostname
wait_for "[[ \"\$(node_state)\" =~ ^(idle|mix|alloc|drain|drng|down)$ ]]"
if [[ "$(node_state)" =~ ^(drain|drng|down)$ ]]; then scontrol update nodename=localhost state=resume; fi
wait_for "[[ \"\$(node_state)\" =~ ^(idle|mix|alloc)$ ]]"
wait_for "sacct -n -X"
echo "slurm: up ($(node_state)), node localhost $(nproc) CPUs, state in $B, $((SECONDS - T0)) s"
