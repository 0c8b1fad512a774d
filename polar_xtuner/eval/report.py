"""The preference report: accuracy, ties, margin quantiles, a bootstrap interval and per-source breakdowns."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Sequence

from polar_xtuner.pair_metrics import accuracy, mean_margin


def _quantile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _accuracy_block(pairs: list[tuple[float, float]]) -> dict:
    return {"accuracy": accuracy(pairs), "n": len(pairs), "ties": sum(c == r for c, r in pairs)}


def preference_report(scores: Sequence[tuple[float, float]], records: Sequence[dict] | None = None,
                      n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Accuracy (chosen > rejected), ties, margins and a 95% bootstrap interval.

    Args:
        scores: (chosen, rejected) per pair.
        records: The pairs' records; ``source``/``category`` give breakdowns.
        n_bootstrap: Resamples for the interval (0 to skip).
        seed: Seed of the resampling.
    """
    pairs = list(scores)
    report = _accuracy_block(pairs)
    margins = sorted(c - r for c, r in pairs)
    report["margin"] = {
        "mean": mean_margin(pairs),
        **{f"q{int(q * 100):02d}": _quantile(margins, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
    }
    if n_bootstrap and pairs:
        rng = random.Random(seed)
        wins = [1.0 if c > r else 0.0 for c, r in pairs]
        n = len(wins)
        accs = sorted(sum(wins[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_bootstrap))
        report["accuracy_ci95"] = [_quantile(accs, 0.025), _quantile(accs, 0.975)]
    if records:
        for key in ("source", "category"):
            groups = defaultdict(list)
            for rec, pair in zip(records, pairs):
                if key in rec:
                    groups[str(rec[key])].append(pair)
            if len(groups) > 1 or (groups and len(next(iter(groups.values()))) < len(pairs)):
                report[f"by_{key}"] = {k: _accuracy_block(v) for k, v in sorted(groups.items())}
    return report


def format_report(report: dict) -> str:
    """A small plain-text table of the report."""
    lines = [
        f"{'pairs':<12}{report['n']}",
        f"{'accuracy':<12}{report['accuracy']:.4f}"
        + (f"  (95% CI {report['accuracy_ci95'][0]:.4f}-{report['accuracy_ci95'][1]:.4f})"
           if "accuracy_ci95" in report else ""),
        f"{'ties':<12}{report['ties']}",
        f"{'margin':<12}mean {report['margin']['mean']:.4f}  median {report['margin']['q50']:.4f}",
    ]
    for key in ("by_source", "by_category"):
        if key in report:
            lines.append(f"{key.replace('_', ' ')}:")
            for name, block in report[key].items():
                lines.append(f"  {name:<18}{block['accuracy']:.4f}  (n={block['n']}, ties={block['ties']})")
    return "\n".join(lines)
