"""The evaluation report: pairwise accuracy, best-of-N and MRR with intervals, margins, breakdowns, a comparison."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

from polar_xtuner.eval.metrics import (
    BOOTSTRAP_SEED,
    N_BOOTSTRAP,
    Outcome,
    disagreements,
    mcnemar,
    metrics,
    outcome,
    paired_difference,
)
from polar_xtuner.records import response_values

# Record keys whose values break the report down, each into by_<key>.
BREAKDOWN_KEYS = ("source", "subset", "category")
# Disagreeing records listed in the printed table (the JSON report lists all).
SHOWN_DISAGREEMENTS = 10


def _quantile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def outcomes_of(scores: Sequence[Sequence[float]], records: Sequence[dict]) -> list[Outcome]:
    """Each record's :class:`~polar_xtuner.eval.metrics.Outcome` from its answers' scores."""
    out = []
    for s, rec in zip(scores, records):
        values, kind = response_values(rec)
        out.append(outcome(list(s), values, kind))
    return out


def ranking_report(scores: Sequence[Sequence[float]], records: Sequence[dict], n_bootstrap: int = N_BOOTSTRAP,
                   seed: int = BOOTSTRAP_SEED) -> dict:
    """The report of scored records (pairs and groups alike).

    Args:
        scores: Each record's answer scores (a pair: chosen, rejected).
        records: The validated records; ``source``, ``subset`` and
            ``category`` give breakdowns.
        n_bootstrap: Resamples of the records for the intervals (0 to skip).
        seed: Seed of the resampling.

    Returns:
        ``accuracy`` (pairwise), ``n`` (pairs), ``ties``, ``records``,
        ``best_of_n``, ``mrr``, their ``*_ci95``, ``top_ties``,
        ``without_best``, ``degenerate``, ``margin`` (mean and quantiles of better minus
        worse), and ``by_<key>`` blocks of the same metrics.
    """
    outs = outcomes_of(scores, records)
    report = metrics(outs, n_bootstrap, seed)
    margins = sorted(m for o in outs for m in o.margins)
    report["margin"] = {  # None without a pair: the report is strict JSON
        "mean": sum(margins) / len(margins) if margins else None,
        **{f"q{int(q * 100):02d}": _quantile(margins, q) if margins else None for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
    }
    for key in BREAKDOWN_KEYS:
        groups: dict[str, list[Outcome]] = defaultdict(list)
        for rec, o in zip(records, outs):
            if key in rec:
                groups[str(rec[key])].append(o)
        if len(groups) > 1 or (groups and len(next(iter(groups.values()))) < len(outs)):
            report[f"by_{key}"] = {k: metrics(v, n_bootstrap, seed) for k, v in sorted(groups.items())}
    return report


def preference_report(scores: Sequence[tuple[float, float]], records: Sequence[dict] | None = None,
                      n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """:func:`ranking_report` of (chosen, rejected) scores of pairs (records: their breakdown keys, if any)."""
    return ranking_report(scores, records if records is not None else [{} for _ in scores], n_bootstrap, seed)


def comparison(this: Sequence[Sequence[float]], other: Sequence[Sequence[float]], records: Sequence[dict],
               where: Sequence[str], n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """This model against another on the same records.

    Returns:
        ``difference``: per metric this, other, this minus other and a paired
        95% interval; ``mcnemar``: the pairwise test; ``disagreements``: the
        records (``where``) on which a pair's outcome or the best-of-N pick
        differs, with both models' scores.
    """
    a, b = outcomes_of(this, records), outcomes_of(other, records)
    differ = disagreements(a, b)
    return {
        "difference": paired_difference(a, b, n_bootstrap, seed),
        "mcnemar": mcnemar(a, b),
        "disagreements": [{"where": where[k], "this": list(this[k]), "other": list(other[k])} for k in differ],
    }


def _ci(block: dict, key: str) -> str:
    ci = block.get(f"{key}_ci95")
    return f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""


def _num(value, spec: str = ".4f") -> str:
    """A figure, or n/a where it is undefined (pairwise accuracy of records without a pair)."""
    return "n/a" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """A small plain-text table of the report."""
    lines = [
        f"{'records':<12}{report['records']}",
        f"{'pairs':<12}{report['n']}",
        f"{'accuracy':<12}{_num(report['accuracy'])}" + _ci(report, "accuracy"),
        f"{'best-of-N':<12}{_num(report['best_of_n'])}" + _ci(report, "best_of_n"),
        f"{'MRR':<12}{_num(report['mrr'])}" + _ci(report, "mrr"),
        f"{'ties':<12}{report['ties']} pairs, {report['top_ties']} records tied at the top",
        f"{'margin':<12}mean {_num(report['margin']['mean'])}  median {_num(report['margin']['q50'])}",
    ]
    if report.get("ci95_warning"):
        lines.append(f"{'note':<12}95% CIs {report['ci95_warning']}")
    if report.get("degenerate"):
        lines.append(f"{'degenerate':<12}{report['degenerate']} records rank nothing (every response equally right "
                     f"or equally wrong): left out of best-of-N and MRR")
    for key in BREAKDOWN_KEYS:
        if f"by_{key}" in report:
            lines.append(f"by {key}:")
            for name, block in report[f"by_{key}"].items():
                lines.append(f"  {name:<18}{_num(block['accuracy'])}  best-of-N {_num(block['best_of_n'])}  "
                             f"(records={block['records']}, pairs={block['n']}, ties={block['ties']})")
    cmp = report.get("compare")
    if cmp:
        lines.append(f"against {cmp['other']}:")
        for key, d in cmp["difference"].items():
            ci = f"  (95% CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})" if d.get("ci95") else ""
            lines.append(f"  {key:<10}{_num(d['this'])} vs {_num(d['other'])}  difference "
                         f"{_num(d['difference'], '+.4f')}{ci}")
        m = cmp["mcnemar"]
        lines.append(f"  McNemar: {m['only_this']} pairs won by this model only, {m['only_other']} by the other "
                     f"only, p = {m['p_value']:.4g}")
        dis = cmp["disagreements"]
        lines.append(f"  {len(dis)} records disagree" + (":" if dis else ""))
        for d in dis[:SHOWN_DISAGREEMENTS]:
            lines.append(f"    {d['where']}")
        if len(dis) > SHOWN_DISAGREEMENTS:
            lines.append(f"    ... and {len(dis) - SHOWN_DISAGREEMENTS} more (the JSON report lists them all)")
    return "\n".join(lines)
