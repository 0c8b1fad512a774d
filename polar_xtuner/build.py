"""Former name of :mod:`polar_xtuner.data_check` (the checker behind tools/build_dataset.py), kept for old imports."""

from .data_check import (  # noqa: F401
    OUTPUTS,
    BuildResult,
    LengthMeter,
    build,
    expand_sources,
    iter_source,
)
