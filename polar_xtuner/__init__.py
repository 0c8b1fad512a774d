"""POLAR reward-model fine-tuning on xtuner: the rules shared by configs, tools and tests."""

__version__ = "0.1.0"
