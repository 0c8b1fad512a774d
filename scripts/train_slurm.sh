#!/usr/bin/env bash
# Train on a Slurm allocation: one task per node, each running torchrun for
# that node's GPUs. Submit from the repository root (the work dir must be on
# a filesystem all nodes share):
#
# Usage:
#   sbatch --nodes=2 --ntasks-per-node=1 --gres=gpu:8 --cpus-per-task=64 \
#     scripts/train_slurm.sh CONFIG --deepspeed deepspeed_zero3 --work-dir /shared/work
#   (or inside `salloc ...`: bash scripts/train_slurm.sh CONFIG ...)
#
# Env (Slurm sets the first three):
#   SLURM_JOB_NODELIST, SLURM_NNODES  the nodes; node 0's hostname becomes ADDR
#   SLURM_NODEID    becomes NODE_RANK in each task
#   NPROC_PER_NODE  processes per node (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists)
#   PORT            rendezvous port on node 0 (default: 29500 across nodes, a free port
#                   on one node; node 0 refuses a taken one with one error line)
#   ADDR            overrides node 0's hostname (e.g. a fast-network address)
set -euo pipefail
# bit-reproducible MKL results on CPU (see MKL_CBWR in polar_xtuner/constants.py)
export MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}
: "${SLURM_JOB_NODELIST:?run inside a Slurm allocation (sbatch or salloc)}"
# sbatch runs a copy of this file from its spool dir: find the repo from the submit dir.
cd "${SLURM_SUBMIT_DIR:-.}"
export NNODES=${SLURM_NNODES:-1}
export ADDR=${ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -z "${NPROC_PER_NODE:-}" ]; then
  export NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
fi
exec srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'NODE_RANK=$SLURM_NODEID exec bash scripts/train.sh "$@"' train_slurm "$@"
