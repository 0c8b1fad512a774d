#!/usr/bin/env bash
# Train with xtuner on one node (N processes, one per GPU), or on one node of
# a multi-node job (see train_multi_node.sh and train_slurm.sh).
#
# Usage:
#   NPROC_PER_NODE=8 bash scripts/train.sh CONFIG --deepspeed deepspeed_zero2 \
#       [--work-dir DIR] [--resume auto|PATH] [other `xtuner train` arguments]
#
# It runs the command `xtuner train` builds (torchrun over xtuner's
# tools/train.py, or python for one process), with two fixes: a failed run
# exits non-zero (`xtuner train` always exits 0), and `--resume auto` resumes
# from WORK_DIR/last_checkpoint (or starts from scratch when there is none).
#
# Env:
#   NPROC_PER_NODE  processes on this node (default: the GPUs nvidia-smi lists, else 1)
#   PORT            rendezvous port (default: a free port on one node, 29500 across
#                   nodes); a PORT taken on this machine stops here with one error line
#   NNODES, NODE_RANK, ADDR  for several nodes (default 1, 0, 127.0.0.1)
#   PYTHON          the interpreter with this project installed (default: python on PATH)
set -euo pipefail
# bit-reproducible MKL results on CPU (see MKL_CBWR in polar_xtuner/constants.py)
export MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
export NPROC_PER_NODE
cmd_file=$(mktemp)
trap 'rm -f "$cmd_file"' EXIT
# Prints the command NUL-separated; bad arguments exit 2 with one error line.
"${PYTHON:-python}" -m polar_xtuner.train.launch "$@" > "$cmd_file"
mapfile -d '' cmd < "$cmd_file"
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"
