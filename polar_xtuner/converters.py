"""Former name of :mod:`polar_xtuner.data_formats` (input data formats), kept so old imports work."""

from .data_formats import (  # noqa: F401
    CONVERTERS,
    DEFAULT_PAIRS_PER_PROMPT,
    FORMATS,
    TAKES_OPTIONS,
    from_policies,
    from_ranked,
    refuse_pairwise,
)
