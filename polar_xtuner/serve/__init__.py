"""Serving a converted model: the engine launcher behind tools/serve.sh and the vLLM plugin."""
