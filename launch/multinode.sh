#!/usr/bin/env bash
# One node of a multi-node run, using torchrun's c10d rendezvous. Start it on every node.
#   launch/multinode.sh NNODES NODE_RANK HOST:PORT NPROC_PER_NODE [PRESET] [options...]
# Any of the first four may instead come from the environment: NNODES, NODE_RANK,
# RDZV_ENDPOINT (host:port of node 0), NPROC_PER_NODE. RDZV_ID names the job (default
# harness); SHARDS as in dev.sh (every node needs the shards at that path). RUN_DIR: default
# runs/PRESET-<rank 0's start time>, the harness's own, which every node takes from rank 0
# (a date on each node would differ); give RUN_DIR to resume a run.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
NNODES=${1:-${NNODES:?number of nodes}}
NODE_RANK=${2:-${NODE_RANK:?rank of this node}}
RDZV_ENDPOINT=${3:-${RDZV_ENDPOINT:?host:port of the rendezvous}}
NPROC_PER_NODE=${4:-${NPROC_PER_NODE:-1}}
PRESET=${5:-lenet}
shift $(( $# < 5 ? $# : 5 ))
RUN_DIR_OPTION=()
if [ -n "${RUN_DIR:-}" ]; then RUN_DIR_OPTION=(--run-dir "$RUN_DIR"); fi
# torchrun shares its rendezvous store with init_process_group by default, and after an
# elastic restart workers can then read the previous attempt's addresses and fail to
# connect (pytorch/pytorch#135712); a separate store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-harness}" \
  -m harness train --preset "$PRESET" --shards "${SHARDS:-shards}" "${RUN_DIR_OPTION[@]}" "$@"
