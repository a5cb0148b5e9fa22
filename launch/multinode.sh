#!/usr/bin/env bash
# One node of a multi-node run, using torchrun's c10d rendezvous. Run the same command on
# every node:
#   launch/multinode.sh NNODES HOST:PORT NPROC_PER_NODE [PRESET] [options...]
#   launch/multinode.sh [PRESET] [options...]      with NNODES, RDZV_ENDPOINT and NPROC_PER_NODE set
# HOST:PORT (RDZV_ENDPOINT): where the rendezvous listens, on one of the nodes. The
# rendezvous numbers the nodes itself (torchrun ignores a node rank under c10d), so rank 0,
# which prints the progress and writes the run's files, may be on any of them.
# NPROC_PER_NODE defaults to 1 in the second form; PRESET to $PRESET, else lenet (also when the
# arguments go on with an option). RDZV_ID names the job (default harness); SHARDS as in
# dev.sh (every node needs the shards at that path). RUN_DIR: default runs/PRESET-<rank
# 0's start time>, the harness's own, which every node takes from rank 0 (a date on each
# node would differ); give RUN_DIR to resume a run. RDZV_TIMEOUT: how long the node at
# HOST, which hosts the rendezvous, waits for the others to join, in seconds (default
# 600, torchrun's own), before torchrun gives up with a RendezvousTimeoutError. The other
# nodes give up sooner if HOST's rendezvous is not up (c10d's read_timeout, 60 s, and
# torchrun's retries: 140 s measured on loopback); read_timeout is left as it is, since
# it also bounds every store call of a running job.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
usage="usage: launch/multinode.sh NNODES HOST:PORT NPROC_PER_NODE [PRESET] [options...]"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  echo "$usage"; echo "(or with NNODES, RDZV_ENDPOINT and NPROC_PER_NODE set: launch/multinode.sh [PRESET] [options...]); the options are harness train's:"
  exec python3 -m harness train --help
fi
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  [ $# -ge 3 ] || { echo "launch/multinode.sh: NNODES, HOST:PORT and NPROC_PER_NODE go together ($usage)" >&2; exit 2; }
  NNODES=$1 RDZV_ENDPOINT=$2 NPROC_PER_NODE=$3
  shift 3
fi
NNODES=${NNODES:-}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || { echo "launch/multinode.sh: NNODES is the number of nodes, got '$NNODES' ($usage)" >&2; exit 2; }
[[ $RDZV_ENDPOINT =~ ^(.+):([0-9]+)$ ]] && [ "${BASH_REMATCH[2]}" -ge 1 ] 2>/dev/null && [ "${BASH_REMATCH[2]}" -le 65535 ] 2>/dev/null ||
  { echo "launch/multinode.sh: HOST:PORT (RDZV_ENDPOINT) is the rendezvous' address, a port from 1 to 65535, got '$RDZV_ENDPOINT' ($usage)" >&2; exit 2; }
# A host that does not resolve: torchrun's retries took two silent minutes, then a traceback.
python3 -c 'import socket, sys
try:
    socket.getaddrinfo(sys.argv[1].removeprefix("[").removesuffix("]"), None)  # [IPv6]:PORT too
except OSError as e:
    sys.exit(f"launch/multinode.sh: HOST:PORT (RDZV_ENDPOINT) {sys.argv[2]}: host {sys.argv[1]} not found ({e.strerror or e})")' "${RDZV_ENDPOINT%:*}" "$RDZV_ENDPOINT" || exit 2
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || { echo "launch/multinode.sh: NPROC_PER_NODE is the number of ranks per node, got '$NPROC_PER_NODE' ($usage)" >&2; exit 2; }
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
[[ $RDZV_TIMEOUT =~ ^[1-9][0-9]*$ ]] || { echo "launch/multinode.sh: RDZV_TIMEOUT is the seconds a node waits for the others, got '$RDZV_TIMEOUT'" >&2; exit 2; }
PRESET=${PRESET:-lenet}  # the environment's, as for slurm/train.sbatch; the first argument wins
if [ $# -gt 0 ] && [[ $1 != -* ]]; then PRESET=$1; shift; fi
RUN_DIR_OPTION=()
if [ -n "${RUN_DIR:-}" ]; then RUN_DIR_OPTION=(--run-dir "$RUN_DIR"); fi
# torchrun shares its rendezvous store with init_process_group by default, and after an
# elastic restart workers can then read the previous attempt's addresses and fail to
# connect (pytorch/pytorch#135712); a separate store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Said now: until every node has joined, torchrun prints nothing.
echo "launch/multinode.sh: waiting up to ${RDZV_TIMEOUT} s (RDZV_TIMEOUT) for $NNODES node(s) to join at $RDZV_ENDPOINT (less, about 2 min, on a node not at that address while the rendezvous there is not up)" >&2
# harness.torchrun: torchrun, passing the ranks' exit status on (75 for a stop, 2 for bad
# input) and honouring a SIGTERM that comes before it has started them.
exec python3 -m harness.torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-harness}" --rdzv-conf="join_timeout=$RDZV_TIMEOUT" \
  -m harness train --preset "$PRESET" --shards "${SHARDS:-shards}" "${RUN_DIR_OPTION[@]}" "$@"
