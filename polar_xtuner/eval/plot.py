"""The score plot: chosen and rejected distributions and the margin histogram."""

from __future__ import annotations

from typing import Sequence

from polar_xtuner.pair_metrics import accuracy


def plot_scores(scores: Sequence[tuple[float, float]], path: str) -> None:
    """Chosen vs rejected score distributions and the margin histogram, in the format of ``path``'s extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [c for c, _ in scores]
    rejected = [r for _, r in scores]
    margins = [c - r for c, r in scores]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    bins = 30
    a.hist(chosen, bins=bins, alpha=0.6, label="chosen")
    a.hist(rejected, bins=bins, alpha=0.6, label="rejected")
    a.set_title("scores")
    a.set_xlabel("reward")
    a.legend()
    b.hist(margins, bins=bins, color="gray")
    b.axvline(0, color="red", linestyle="--")
    acc = accuracy(list(scores))
    b.set_title(f"chosen - rejected (accuracy {acc:.3f}, n={len(margins)})")
    b.set_xlabel("margin")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
