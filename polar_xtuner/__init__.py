"""POLAR reward-model fine-tuning on xtuner.

A small core (constants, errors, outputs, precision, records, encoding,
hf_layout, flags, scoring, pair_metrics, client) under one subpackage per job:
data, train, convert, eval, serve, rl and demo. docs/development.md draws the
layers; pyproject.toml's import-linter contract enforces them. Importing the
package runs nothing: entry points set their process up
(:func:`polar_xtuner.cli.entry.start_tool`).
"""

__version__ = "0.1.0"
