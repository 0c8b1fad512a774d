"""The score plot: best against other answers' score distributions and the margin histogram, per model."""

from __future__ import annotations

from typing import Sequence

from polar_xtuner.eval.metrics import best_responses, ordered_pairs
from polar_xtuner.records import response_values


def _panels(scores: Sequence[Sequence[float]], records: Sequence[dict] | None):
    """Scores of the best answers, of the others, and every ordered pair's margin (better minus worse)."""
    best, other, margins = [], [], []
    for k, s in enumerate(scores):
        values, kind = response_values(records[k]) if records is not None else ([1.0, 0.0], "label")
        top = best_responses(values, kind)
        for i, v in enumerate(s):
            (best if i in top else other).append(v)
        margins += [s[i] - s[j] for i, j in ordered_pairs(values)]
    return best, other, margins


def _bins(values: list[float], n: int = 30) -> list[float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def plot_scores(scores: Sequence[Sequence[float]], path: str, records: Sequence[dict] | None = None,
                others: Sequence[tuple[str, Sequence[Sequence[float]]]] = (), name: str = "model") -> None:
    """Score distributions and margins, a column per model, in the format of ``path``'s extension.

    Args:
        scores: Each record's answer scores (pairs: chosen, rejected).
        records: The records (None: ``scores`` are pairs); best answers are
            the chosen, correct or top-labelled ones.
        others: ``(name, scores)`` of models compared on the same records,
            drawn beside it on the same axes.
        name: This model's name in the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(name, scores), *others]
    panels = [_panels(s, records) for _, s in models]
    # one column per model, side by side: scores above, margins below, each row on one x axis
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models) + 1, 8), squeeze=False, sharex="row")
    score_bins = _bins([v for best, other, _ in panels for v in best + other])
    margin_bins = _bins([m for _, _, margins in panels for m in margins])  # the same bins for every model
    for (label, _), (best, other, margins), a, b in zip(models, panels, axes[0], axes[1]):
        a.hist(best, bins=score_bins, alpha=0.6, label="chosen / best")
        a.hist(other, bins=score_bins, alpha=0.6, label="rejected / other")
        a.set_title(f"{label}: scores")
        a.set_xlabel("reward")
        a.legend()
        b.hist(margins, bins=margin_bins, color="gray")
        b.axvline(0, color="red", linestyle="--")
        acc = sum(m > 0 for m in margins) / len(margins) if margins else float("nan")
        b.set_title(f"{label}: better - worse (pairwise accuracy {acc:.3f}, n={len(margins)})")
        b.set_xlabel("margin")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
