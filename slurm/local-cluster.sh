#!/usr/bin/env bash
# A Slurm cluster of N nodes on one machine, for tests of the sbatch scripts.
#   slurm/local-cluster.sh [start [N]]  install (apt-get) and start munged, slurmctld and one
#                                       slurmd per node (N nodes, default 1); returns once
#                                       `sinfo` shows every node idle
#   slurm/local-cluster.sh stop         cancel all jobs, stop every slurmd, slurmctld, munged
#   slurm/local-cluster.sh status       show the daemons and the nodes
# Runs as root on Debian/Ubuntu without systemd (containers, CI): the daemons are started
# directly. Idempotent: a running cluster with the same config is left as it is; a start
# with another N cancels all jobs, rewrites the config and restarts the Slurm daemons.
# Config: /etc/slurm/slurm.conf. localhost is the controller; the nodes are node1..nodeN,
# each a `slurmd -N nodeI` with its own Port, NodeHostname=localhost, NodeAddr=127.0.0.1,
# and the CPUs and RealMemory that `slurmd -C` reports (so N nodes claim the machine N
# times over). The names node1..nodeN do not resolve: Slurm reaches a node at its
# NodeAddr, as on clusters whose node names are not host names. Logs in /var/log/slurm/.
set -Eeuo pipefail
trap 'echo "local-cluster: FAILED (line $LINENO): $BASH_COMMAND" >&2' ERR
# The daemons (slurmctld, slurmd, munged) live in /usr/sbin, which a user's PATH often lacks.
export PATH="$PATH:/usr/sbin:/sbin"

PARTITION=${SLURM_LOCAL_PARTITION:-debug}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
RUN=/run/slurm-local
PKGS=(munge slurmctld slurmd slurm-client)
# node I listens on FIRST_PORT + I - 1; not slurmd's default 6818, which the one-node
# cluster of earlier versions of this script (node "localhost") used
FIRST_PORT=6821

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: FAILED: $*" >&2; exit 1; }
show_log() { [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2; } || true; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL
  local name=$1 pidfile=$2 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored SIGTERM, killing it"; kill -9 "$pid" || true; fi
  rm -f "$pidfile"
  say "stopped $name ($pid)"
}

cancel_jobs() {
  local jobs
  if alive "$RUN/slurmctld.pid" && jobs=$(squeue -h -o %i 2>/dev/null) && [ -n "$jobs" ]; then
    say "cancelling jobs $(echo $jobs)"  # slurmstepd and the jobs' processes would outlive slurmd
    scancel $jobs || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
}

stop_slurmds() {  # every slurmd started here, whatever the config says now
  local pidfile name
  # slurmd-NODE.pid per node; slurmd.pid: the one-node cluster of earlier versions
  for pidfile in "$RUN"/slurmd-*.pid "$RUN/slurmd.pid"; do
    [ -e "$pidfile" ] || continue
    name=${pidfile##*/}
    stop_pidfile "${name%.pid}" "$pidfile"
  done
}

stop() {
  cancel_jobs
  stop_slurmds
  stop_pidfile slurmctld "$RUN/slurmctld.pid"
  stop_pidfile munged /run/munge/munged.pid
}

install() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]}"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd the packages' postinst can't start services; that is expected here.
  apt-get update -qq >/tmp/local-cluster-apt.log 2>&1 || { cat /tmp/local-cluster-apt.log >&2; die "apt-get update"; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/local-cluster-apt.log 2>&1 ||
    { tail -n 30 /tmp/local-cluster-apt.log >&2; die "apt-get install ${missing[*]}"; }
}

node_names() { seq -f "node%g" "$NODES"; }

config_text() {  # config_text HW: slurm.conf for $NODES nodes, each with the hardware HW
  local hw=$1 i
  cat <<EOF
# Written by slurm/local-cluster.sh: a test cluster of $NODES node(s) on localhost.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
# %n: every slurmd on this machine has its own spool directory, pid file and log.
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# No cgroups or systemd in a container: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol (no accounting database, so no sacct) for 16-60 s.
# A short MinJobAge also keeps \`sbatch --wait\` polling every 8 s instead of every 32 s.
MinJobAge=16
SlurmdTimeout=60
MailProg=/bin/true
# A requeued job becomes eligible cred_expire + 1 s after its requeue (default 120 s), then
# waits for the next backfill pass (default every 30 s): about 16 s and 2 s here.
AuthInfo=cred_expire=15
SchedulerParameters=bf_interval=2
EOF
  for i in $(seq "$NODES"); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((FIRST_PORT + i - 1)) $hw State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

configure() {  # (re)writes $CONF when it differs, after stopping the Slurm daemons of the old one
  local hw new
  hw=$(slurmd -C | head -n 1) || die "slurmd -C (hardware detection)"
  hw=${hw#NodeName=* }  # CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..
  [[ $hw == CPUs=* && $hw == *RealMemory=* ]] || die "unexpected output of 'slurmd -C': $hw"
  new=$(config_text "$hw")
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 0; fi
  cancel_jobs  # while the old config's controller still runs
  stop_slurmds
  stop_pidfile slurmctld "$RUN/slurmctld.pid"
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$new" >"$CONF"
  say "wrote $CONF ($NODES node(s), each $hw)"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating the munge key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  # munged insists on these owners and modes.
  mkdir -p /var/lib/munge /var/log/munge
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  rm -f /run/munge/munged.pid
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged || { show_log /var/log/munge/munged.log; die "munged did not start"; }
  for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.5; done
  show_log /var/log/munge/munged.log
  die "munge does not work (munge -n | unmunge fails)"
}

start_daemon() {  # start_daemon NAME PIDFILE LOGFILE PROGRAM [ARGS]
  local name=$1 pidfile=$2 log=$3
  shift 3
  alive "$pidfile" && return 0
  say "starting $name"
  "/usr/sbin/$1" "${@:2}" || { show_log "$log"; die "$name did not start"; }
  for _ in $(seq 20); do alive "$pidfile" && return 0; sleep 0.5; done
  show_log "$log"
  die "$name exited right after starting"
}

not_ready() {  # prints "NODE STATE" for each node that is not up; puts drained or down ones back in service
  local name state
  for name in $(node_names); do
    state=$(sinfo -h -N -n "$name" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle | mixed | allocated | completing) continue ;;
      drain* | down* | fail*)  # left over from an earlier run
        scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    echo "$name ${state:-(no answer from slurmctld)}"
  done
}

start() {
  local name pending="" waited=0
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "the number of nodes must be a positive integer (got '$NODES')"
  if [ "$(id -u)" -ne 0 ]; then
    [ -z "$(not_ready)" ] && { say "running (not root: config not checked)"; return 0; }
    die "run as root (it installs packages and starts daemons)"
  fi
  install
  mkdir -p "$LOGS" "$RUN" /var/spool/slurmctld /var/spool/slurmd
  configure
  start_munge
  start_daemon slurmctld "$RUN/slurmctld.pid" "$LOGS/slurmctld.log" slurmctld
  for name in $(node_names); do
    start_daemon "slurmd $name" "$RUN/slurmd-$name.pid" "$LOGS/slurmd-$name.log" slurmd -N "$name"
  done
  while [ "$waited" -lt "$WAIT_S" ]; do
    pending=$(not_ready)
    [ -z "$pending" ] && { say "ready: $(node_names | paste -sd, -) idle (partition $PARTITION)"; return 0; }
    sleep 1
    waited=$((waited + 1))
  done
  echo "local-cluster: FAILED: not every node idle after ${WAIT_S}s: $(echo $pending)" >&2
  sinfo -N -l >&2 || true
  show_log "$LOGS/slurmctld.log"
  for name in $(node_names); do show_log "$LOGS/slurmd-$name.log"; done
  exit 1
}

status() {
  local pidfile
  for pidfile in "$RUN/slurmctld.pid" "$RUN"/slurmd-*.pid /run/munge/munged.pid; do
    [ -e "$pidfile" ] || continue
    if alive "$pidfile"; then echo "$(basename "$pidfile" .pid): running ($(cat "$pidfile"))"; else echo "$(basename "$pidfile" .pid): stopped"; fi
  done
  sinfo -N 2>/dev/null || true
}

NODES=${2:-1}
case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 [start [NODES] | stop | status]" >&2; exit 2 ;;
esac
