"""Chosen/rejected pairs: the one place that interleaves them and counts wins.

Scoring sends the two answers of each record as consecutive sequences
(chosen, rejected, chosen, rejected, ...); these helpers split them back and
compute the accuracy every report, hook and benchmark uses.
"""

from __future__ import annotations

import math
from typing import Sequence


def interleave(pairs: Sequence[tuple]) -> list:
    """[c0, r0, c1, r1, ...] from [(c0, r0), (c1, r1), ...]."""
    return [x for pair in pairs for x in pair]


def unflatten(flat: Sequence) -> list[tuple]:
    """[(c0, r0), (c1, r1), ...] from [c0, r0, c1, r1, ...].

    Raises:
        ValueError: An odd number of items (a chosen without its rejected).
    """
    if len(flat) % 2:
        raise ValueError(f"{len(flat)} scores cannot be chosen/rejected pairs")
    return list(zip(flat[0::2], flat[1::2]))


def wins(pairs: Sequence[tuple[float, float]]) -> int:
    """Pairs whose chosen answer scores strictly higher (a tie is not a win)."""
    return sum(c > r for c, r in pairs)


def accuracy(pairs: Sequence[tuple[float, float]]) -> float:
    """Share of wins; NaN for no pairs."""
    return wins(pairs) / len(pairs) if pairs else math.nan


def mean_margin(pairs: Sequence[tuple[float, float]]) -> float:
    """Mean of chosen - rejected; NaN for no pairs."""
    return sum(c - r for c, r in pairs) / len(pairs) if pairs else math.nan
