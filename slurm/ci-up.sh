#!/usr/bin/env bash
# A real Slurm cluster on this one machine for CI and tests/test_cluster.py: munged, MariaDB, slurmdbd (sacct
# needs it and submitit reads job states only from sacct), slurmctld and one or two slurmd. Debian/Ubuntu, root.
#   bash slurm/ci-up.sh              one node, "localhost", everything on 127.0.0.1
#   bash slurm/ci-up.sh --nodes 2    two nodes, vaejob-n1 and vaejob-n2, each slurmd in its own network and
#                                    UTS namespace (own address, own hostname) on a bridge this script makes
#   bash slurm/ci-up.sh stop         stop its daemons (munged too); remove the namespaces, links, host entries
# Safe to re-run (switching between 1 and 2 nodes restarts the daemons). Prints one line. Exit 0: up;
# 3: this machine cannot host it (not root, no apt, packages unavailable, a slurm.conf this script did not
# write, or its private network is taken); 1: anything else (see the logs under $SLURM_CI_DIR/log).
# Env: SLURM_CI_DIR (state, logs; default /tmp/slurm-ci), SLURM_CI_DBPORT (MariaDB port; default 3307),
# SLURM_CI_NET (the /24 of the two-node bridge; default 10.87.0).
#
# Two nodes: the bridge vjbr0 holds ${NET}.1 (slurmctld binds there: a namespace has its own loopback), node i
# is ${NET}.1i behind a veth pair vjn<i>h (host side, on the bridge) / vjn<i> (inside vaejob-n<i>). Traffic flows
# only between these addresses; slurmctld (hostname vaejob-ctl in a UTS namespace of its own) binds ${NET}.1. /etc/hosts gets one line per name, marked, removed by `stop`. Debian's Slurm
# is built without --enable-multiple-slurmd (no `slurmd -N` for a second daemon), so each slurmd finds its
# node name from its namespace's own hostname, as on real nodes. The file system is shared: the repository,
# the venv and run dirs are the same paths on both nodes. Both nodes declare all CPUs of the machine.
set -euo pipefail
B=${SLURM_CI_DIR:-/tmp/slurm-ci}
DBPORT=${SLURM_CI_DBPORT:-3307}
NET=${SLURM_CI_NET:-10.87.0}
MARK="# written by vaejob slurm/ci-up.sh"
HOSTS_MARK="# vaejob slurm/ci-up.sh"
T0=$SECONDS

cannot() { echo "slurm: cannot start here: $*" >&2; exit 3; }
fail() { echo "slurm: failed: $* (logs: $B/log)" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Poll a command for up to 60 s.
wait_for() {
  local _
  for _ in $(seq 120); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  fail "timed out waiting for: $1"
}
stop_pid() { # kill the daemon of a pid file and wait until it is gone
  if alive "$1"; then
    local pid
    pid=$(cat "$1")
    kill "$pid"
    wait_for "! kill -0 $pid"
  fi
}
stop_slurm() { # newest daemon first; a dead slurmd can look idle in sinfo, so use pid files
  local p
  for p in "$B"/state/slurmd*.pid; do stop_pid "$p"; done
  stop_pid "$B/state/slurmctld.pid"
}
remove_network() {
  local i
  for i in 1 2; do
    ip netns del "vaejob-n$i" 2>/dev/null || true # takes its end of the veth pair, and so the pair, with it
    ip link del "vjn${i}h" 2>/dev/null || true
  done
  ip link del vjbr0 2>/dev/null || true
  if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    grep -vF "$HOSTS_MARK" /etc/hosts >/etc/hosts.vaejob-tmp || true
    cat /etc/hosts.vaejob-tmp >/etc/hosts # in place: /etc/hosts may be a bind mount
    rm -f /etc/hosts.vaejob-tmp
  fi
}

NODES=1
case "${1:-}" in
  stop)
    stop_slurm
    stop_pid "$B/state/slurmdbd.pid"
    stop_pid "$B/dbrun/mysqld.pid"
    stop_pid /run/munge/munged.pid
    remove_network
    echo "slurm: stopped"
    exit 0
    ;;
  --nodes)
    NODES=${2:-}
    [[ "$NODES" =~ ^[12]$ ]] || { echo "slurm: --nodes takes 1 or 2" >&2; exit 2; }
    ;;
  "") ;;
  *) echo "slurm: usage: bash slurm/ci-up.sh [--nodes 1|2 | stop]" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || cannot "needs root (it writes /etc/slurm and starts system daemons)"
if [ -e /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  cannot "/etc/slurm/slurm.conf exists and was not written by this script (a real cluster?)"
fi

need=(slurmctld slurmd slurmdbd sbatch sacct munged mungekey mariadbd mariadb-install-db)
[ "$NODES" = 1 ] || need+=(ip unshare nsenter)
missing() {
  local c
  for c in "${need[@]}"; do command -v "$c" >/dev/null || return 0; done
  return 1
}
if missing; then
  command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get"
  mkdir -p "$B/log"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client slurmdbd munge mariadb-server iproute2 util-linux; } >"$B/log/apt.log" 2>&1 ||
    cannot "apt-get install failed (see $B/log/apt.log)"
  ! missing || cannot "packages installed but commands are missing: ${need[*]}"
fi

mkdir -p "$B"/state/ctld "$B"/log "$B"/db "$B"/dbrun /run/munge /etc/slurm
chown munge:munge /run/munge
chown mysql:mysql "$B"/db "$B"/dbrun # mariadbd runs as mysql and creates its socket there

if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
fi
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged # its socket is a file: every namespace sees it
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

if [ "$NODES" = 1 ]; then
  CTLD=localhost
  NODE_NAMES=(localhost)
  NODE_LINES=("NodeName=localhost")
  PARTITION_NODES=localhost
else
  # The private network: refuse a /24 that something else on this machine already routes.
  if ! ip link show vjbr0 >/dev/null 2>&1 && ip -4 route show | grep -q "^${NET}\.0/24"; then
    cannot "${NET}.0/24 is already routed here: set SLURM_CI_NET to a free private /24 (e.g. 10.88.0)"
  fi
  CTLD="vaejob-ctl(${NET}.1)" # slurmctld runs under that hostname, so it binds the bridge address
  NODE_NAMES=(vaejob-n1 vaejob-n2)
  NODE_LINES=("NodeName=vaejob-n1 NodeAddr=${NET}.11 NodeHostname=vaejob-n1"
    "NodeName=vaejob-n2 NodeAddr=${NET}.12 NodeHostname=vaejob-n2")
  PARTITION_NODES=vaejob-n[1-2]
fi

# cred_expire=10: a requeued job restarts after ~11 s instead of 120 s; bf/sched_interval: fast scheduling.
MEM=$(($(free -m | awk '/^Mem:/{print $2}') / 2))
{
  printf '%s\n' "$MARK" ClusterName=ci "SlurmctldHost=$CTLD" AuthInfo=cred_expire=10 MailProg=/bin/true \
    CommunicationParameters=NoCtldInAddrAny,NoInAddrAny \
    "StateSaveLocation=$B/state/ctld" "SlurmdSpoolDir=$B/state/d-%n" "SlurmctldPidFile=$B/state/slurmctld.pid" \
    "SlurmdPidFile=$B/state/slurmd-%n.pid" "SlurmctldLogFile=$B/log/slurmctld.log" "SlurmdLogFile=$B/log/slurmd-%n.log" \
    ProctrackType=proctrack/linuxproc TaskPlugin=task/none SelectType=select/cons_tres SelectTypeParameters=CR_Core \
    SchedulerType=sched/backfill SchedulerParameters=bf_interval=1,sched_interval=2 ReturnToService=2 \
    JobAcctGatherType=jobacct_gather/linux AccountingStorageType=accounting_storage/slurmdbd \
    AccountingStorageHost=localhost
  for line in "${NODE_LINES[@]}"; do echo "$line CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN"; done
  echo "PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP"
} >"$B"/slurm.conf
if ! cmp -s "$B"/slurm.conf /etc/slurm/slurm.conf; then # another layout: restart rather than reconfigure
  stop_slurm
  install -m 644 "$B"/slurm.conf /etc/slurm/slurm.conf
fi
if [ "$NODES" = 1 ]; then
  remove_network
else
  if ! ip link show vjbr0 >/dev/null 2>&1; then
    ip link add vjbr0 type bridge
    ip addr add "${NET}.1/24" dev vjbr0
    ip link set vjbr0 up
  fi
  for i in 1 2; do
    if ! ip netns list | grep -qw "vaejob-n$i"; then
      ip netns add "vaejob-n$i"
      ip link add "vjn${i}h" type veth peer name "vjn$i"
      ip link set "vjn$i" netns "vaejob-n$i"
      ip link set "vjn${i}h" master vjbr0 up
      ip netns exec "vaejob-n$i" ip addr add "${NET}.1$i/24" dev "vjn$i"
      ip netns exec "vaejob-n$i" ip link set "vjn$i" up
      ip netns exec "vaejob-n$i" ip link set lo up
    fi
  done
  if ! grep -qF "$HOSTS_MARK" /etc/hosts; then
    printf '%s\n' "${NET}.1 vaejob-ctl $HOSTS_MARK" "${NET}.11 vaejob-n1 $HOSTS_MARK" \
      "${NET}.12 vaejob-n2 $HOSTS_MARK" >>/etc/hosts
  fi
fi

mkdir -p "${NODE_NAMES[@]/#/$B/state/d-}"
alive "$B"/state/slurmdbd.pid || slurmdbd
wait_for "sacctmgr -n show cluster"
if ! alive "$B"/state/slurmctld.pid; then
  if [ "$NODES" = 1 ]; then
    slurmctld
  else # its own UTS namespace only: it must see itself as vaejob-ctl; the network stays the host's
    unshare --uts sh -c "hostname vaejob-ctl && exec slurmctld"
  fi
fi
wait_for "scontrol ping | grep -q UP"
if [ "$NODES" = 1 ]; then
  alive "$B"/state/slurmd-localhost.pid || slurmd -N localhost # declared as localhost, not the hostname
else
  for i in 1 2; do
    alive "$B/state/slurmd-vaejob-n$i.pid" ||
      # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mount slurmd needs.
      nsenter --net="/run/netns/vaejob-n$i" unshare --uts sh -c "hostname vaejob-n$i && exec slurmd"
  done
fi
node_states() { sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' '; }
wait_for "[ \$(sinfo -h -N -o %t | grep -cE '^(idle|mix|alloc|drain|drng|down)') = ${#NODE_NAMES[@]} ]"
for n in "${NODE_NAMES[@]}"; do
  if [[ "$(sinfo -h -N -n "$n" -o %t)" =~ ^(drain|drng|down)$ ]]; then scontrol update nodename="$n" state=resume; fi
done
wait_for "[ \$(sinfo -h -N -o %t | grep -cE '^(idle|mix|alloc)$') = ${#NODE_NAMES[@]} ]"
wait_for "sacct -n -X"
echo "slurm: up ($(node_states | xargs)), ${#NODE_NAMES[@]} node(s) ${NODE_NAMES[*]}, $(nproc) CPUs each, state in $B, $((SECONDS - T0)) s"
