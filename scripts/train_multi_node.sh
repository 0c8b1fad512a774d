#!/usr/bin/env bash
# Train on several nodes: run this same command on every node, each with its
# own NODE_RANK. The work dir must be on a filesystem all nodes share
# (DeepSpeed writes one shard per rank into each checkpoint).
#
# Usage (node 0 of 2, 8 GPUs each; on node 1 set NODE_RANK=1):
#   NNODES=2 NODE_RANK=0 ADDR=10.0.0.1 PORT=29500 NPROC_PER_NODE=8 \
#     bash scripts/train_multi_node.sh CONFIG --deepspeed deepspeed_zero3 --work-dir /shared/work
#
# Env (all required but PORT and NPROC_PER_NODE):
#   NNODES          number of nodes
#   NODE_RANK       this node's index, 0..NNODES-1
#   ADDR            address of node 0, reachable from every node
#   PORT            free TCP port on node 0, the same on every node (default 29500;
#                   node 0 refuses a taken one with one error line)
#   NPROC_PER_NODE  processes per node, one per GPU (default: the GPUs nvidia-smi lists)
set -euo pipefail
# bit-reproducible MKL results on CPU (see MKL_CBWR in polar_xtuner/constants.py)
export MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node from 0}"
: "${ADDR:?set ADDR, the address of node 0}"
export NNODES NODE_RANK ADDR
exec bash "$(dirname "$0")/train.sh" "$@"
