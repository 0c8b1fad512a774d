#!/usr/bin/env bash
# Every GPU path in one prepared run (bench/gpu_check.py runs the steps of bench/gpu_steps.py).
#
# Usage:
#   bash scripts/gpu_check.sh RESULTS_DIR [--cpu-smoke] [--only STEP,...] [--budget SECONDS] [--force]
#
# On a GPU machine: the repository with .whl/ beside it (make gpu-wheels), then
#   bash scripts/gpu_check.sh RESULTS_DIR
# The carried wheels are installed with pip --no-index --no-deps --target into a
# scratch folder that goes first on PYTHONPATH (so transformers 4.48 shadows the
# machine's own), and `python` is made to mean this python3 where the machine has
# no `python` (xtuner's CLI starts `python`). Without .whl/ the installed packages
# are used as they are (make setup's .venv, for the CPU smoke run in the tests).
#
# RESULTS_DIR/results.json holds every step's figures, written as each ends, and
# RESULTS_DIR/log.txt the steps' output (a relative RESULTS_DIR is taken from
# where the command runs). A RESULTS_DIR holding an earlier run is refused; with
# --force its files are moved aside to RESULTS_DIR.<time> first. Exit 0: every
# step passed; 1: one or more failed (results.json says which); 2: bad arguments,
# an unusable RESULTS_DIR, or no GPU without --cpu-smoke (one line each).
set -uo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash scripts/gpu_check.sh RESULTS_DIR [--cpu-smoke] [--only STEP,...] [--budget SECONDS] [--force]" >&2
  exit 2
fi
# a relative RESULTS_DIR is where the command was run from, not the repository root it moves to
results=$1
shift
[[ "$results" == /* ]] || results="$PWD/$results"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/polar_gpu_check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if compgen -G ".whl/*.whl" > /dev/null && [ "$pyver" != 3.12 ]; then
  # make gpu-wheels fetches the GPU machine's cp312 builds; elsewhere the installed packages serve
  echo "note: .whl/ holds Python 3.12 wheels (the GPU machine's); Python $pyver uses its installed packages" >&2
elif compgen -G ".whl/*.whl" > /dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $scratch/site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" .whl/*.whl \
    || { echo "error: installing the carried wheels from .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$scratch/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$scratch/site/bin:$PATH"
fi
if ! command -v python > /dev/null || [ "$(command -v python)" != "$(command -v "$PY")" ]; then
  # a script, not a symlink: a venv's python found through a link elsewhere loses its venv
  mkdir -p "$scratch/bin" && printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$PY")" > "$scratch/bin/python"
  chmod +x "$scratch/bin/python"
  export PATH="$scratch/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}
# The start-up file `make setup` installs (docs/training.md): through it a plain one-process
# `xtuner train`, the users' command, gets a free rendezvous port before DeepSpeed starts.
"$PY" -m polar_xtuner.cpu_ranks --install > /dev/null \
  || echo "note: could not install the start-up file; a one-process xtuner train falls back to DeepSpeed's port 29500" >&2
"$PY" -m bench.gpu_check "$results" "$@" --work "$scratch/work"
