#!/usr/bin/env bash
# Serve a converted POLAR model with raw reward scores, and print how to evaluate it.
#
# Usage:
#   bash tools/serve.sh MODEL_DIR [--engine vllm|sglang|lmdeploy] [--port N] [--host ADDR]
#        [--dtype D] [--python PY] [--replicas N [--router-policy P] [--advertise-host H]]
#        [extra engine args]
#
# --replicas N starts N engines on the ports after --port, and vllm-router on --port in
# front of them (health checks, one address); the scoring client places each prompt's
# rollouts on one replica (docs/serving.md, "A fleet"). A replica that exits is restarted.
#
# vLLM gets --runner pooling --pooler-config '{"use_activation": false}' (raw scores,
# not its default sigmoid), --trust-remote-code, the model's dtype and max_length;
# sglang --is-embedding; lmdeploy --backend pytorch. Without CUDA, vLLM's CPU build
# from .venv-serve (`make serve-setup`) runs it, with --block-size 32; our vLLM
# plugin, installed there, scores the last token with prefix caching (README,
# "Serve"). Waits until the server answers, prints the address and the
# eval_pref command, and stays in the foreground
# (Ctrl-C stops the engine and its workers). Exit codes: 2 bad input or environment
# (a --port already taken is refused before the engine starts; an engine that exits
# before it answers), else the engine's own.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# polar_xtuner.serve.launcher uses the standard library only: any python3 can run it, with or
# without xtuner (the shipped model code it checks against is found, not imported).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m polar_xtuner.serve.launcher "$@"
