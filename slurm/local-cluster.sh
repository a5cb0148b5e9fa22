#!/usr/bin/env bash
# A single-machine Slurm cluster on localhost, for tests of the sbatch scripts.
#   slurm/local-cluster.sh [start]   install (apt-get) and start munged, slurmctld, slurmd;
#                                    returns once `sinfo` shows the node idle
#   slurm/local-cluster.sh stop      cancel all jobs, stop the three daemons
#   slurm/local-cluster.sh status    show the daemons and the node
# Runs as root on Debian/Ubuntu without systemd (containers, CI): the daemons are started
# directly. Idempotent: a running cluster with the same config is left as it is.
# Config: /etc/slurm/slurm.conf (localhost is the controller and the one node, with the
# CPUs and RealMemory that `slurmd -C` reports); logs in /var/log/slurm/.
set -Eeuo pipefail
trap 'echo "local-cluster: FAILED (line $LINENO): $BASH_COMMAND" >&2' ERR

PARTITION=${SLURM_LOCAL_PARTITION:-debug}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
RUN=/run/slurm-local
PKGS=(munge slurmctld slurmd slurm-client)

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

stop() {
  local jobs
  if alive "$RUN/slurmctld.pid" && jobs=$(squeue -h -o %i 2>/dev/null) && [ -n "$jobs" ]; then
    say "cancelling jobs $(echo $jobs)"  # slurmstepd and the jobs' processes would outlive slurmd
    scancel $jobs || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  stop_pidfile slurmd "$RUN/slurmd.pid"
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

write_config() {  # writes $CONF; returns 0 when it changed
  local hw new
  hw=$(slurmd -C | head -n 1) || die "slurmd -C (hardware detection)"
  hw=${hw#NodeName=* }  # CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..
  [[ $hw == CPUs=* && $hw == *RealMemory=* ]] || die "unexpected output of 'slurmd -C': $hw"
  new=$(cat <<EOF
# Written by slurm/local-cluster.sh: a one-node test cluster on localhost.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
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
NodeName=localhost $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 1; fi
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$new" >"$CONF"
  say "wrote $CONF (localhost: $hw)"
  return 0
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

start_daemon() {  # start_daemon NAME LOGFILE [ARGS]
  local name=$1 log=$2 pidfile=$RUN/$1.pid
  shift 2
  alive "$pidfile" && return 0
  say "starting $name"
  "/usr/sbin/$name" "$@" || { show_log "$log"; die "$name did not start"; }
  for _ in $(seq 20); do alive "$pidfile" && return 0; sleep 0.5; done
  show_log "$log"
  die "$name exited right after starting"
}

node_state() { sinfo -h -N -n localhost -o "%T" 2>/dev/null | head -n 1 || true; }

start() {
  if [ "$(id -u)" -ne 0 ]; then
    case "$(node_state)" in idle | mixed | allocated | completing) say "running (not root: config not checked)"; return 0 ;; esac
    die "run as root (it installs packages and starts daemons)"
  fi
  install
  mkdir -p "$LOGS" "$RUN" /var/spool/slurmctld /var/spool/slurmd
  if write_config; then stop_pidfile slurmd "$RUN/slurmd.pid"; stop_pidfile slurmctld "$RUN/slurmctld.pid"; fi
  start_munge
  start_daemon slurmctld "$LOGS/slurmctld.log"
  start_daemon slurmd "$LOGS/slurmd.log" -N localhost
  local state="" waited=0
  while [ "$waited" -lt "$WAIT_S" ]; do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated | completing) say "ready: node localhost is $state (partition $PARTITION)"; return 0 ;;
      drain* | down* | fail*)  # left over from an earlier run: put the node back in service
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
    waited=$((waited + 1))
  done
  echo "local-cluster: FAILED: node localhost not idle after ${WAIT_S}s (state: '${state:-no answer from slurmctld}')" >&2
  sinfo -N -l >&2 || true
  scontrol show node localhost >&2 || true
  show_log "$LOGS/slurmctld.log"
  show_log "$LOGS/slurmd.log"
  exit 1
}

status() {
  local d
  for d in "$RUN/slurmctld.pid" "$RUN/slurmd.pid" /run/munge/munged.pid; do
    if alive "$d"; then echo "$(basename "$d" .pid): running ($(cat "$d"))"; else echo "$(basename "$d" .pid): stopped"; fi
  done
  sinfo -N 2>/dev/null || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
