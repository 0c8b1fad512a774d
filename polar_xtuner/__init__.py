"""POLAR reward-model fine-tuning on xtuner: the rules shared by configs, tools and tests."""

import os as _os

# MKL's default CPU path gives results that depend on how the operands happen
# to be aligned in memory: the same fp32 weights scored 2.3e-3 apart in two
# processes on an AMD EPYC. Its conditional-numerical-reproducibility mode
# makes CPU scores bit-reproducible. It must be set before MKL's first call,
# so it is set on the package's import (tools, configs) and by the Makefile,
# the launchers and the tests; a value the user set is kept.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
