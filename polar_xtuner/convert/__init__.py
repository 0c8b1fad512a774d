"""Training checkpoints into Hugging Face model dirs, verified (`python -m polar_xtuner.convert`)."""
