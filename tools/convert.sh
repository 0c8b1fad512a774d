#!/usr/bin/env bash
# Convert a trained checkpoint into a verified Hugging Face POLAR model.
#
# Usage:
#   bash tools/convert.sh CONFIG CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32]
#        [--max-shard-size 5GB] [--force] [--no-verify] [--trust-remote-code]
#
# CHECKPOINT: a .pth file, a DeepSpeed checkpoint dir (iter_N.pth/), or a work
# dir (its last checkpoint). Exit codes: 0 ok, 2 bad input, 3 verification failed.
# Runs with the `python` on PATH (activate the project's .venv first), or $PYTHON.
set -euo pipefail
exec "${PYTHON:-python}" -m polar_xtuner.convert "$@"
