"""Ranking metrics of scored records, their bootstrap intervals, and the paired comparison of two models.

A record is a group of N >= 2 responses with one value each: a label or a
score (higher is better) or a correctness flag (True is better); a
prompt/reference/chosen/rejected pair is the group [chosen, rejected] with
labels [1, 0]. Its *best* responses are the correct ones, or those with the
highest value. Per record (:class:`Outcome`):

* pairwise: every ordered pair the values define (i better than j), won when
  i's score is strictly higher; a tie is not a win;
* best-of-N: 1 when every response that shares the top score is a best one (a
  tie between a best and a worse response at the top is not a pick of the
  best), 0 otherwise, and 0 when the group has no best response (no correct
  one);
* reciprocal rank of the first best response: 1 / (1 + the responses that are
  not best and score at least as high as the highest-scored best one); 0
  without a best response.

Ties always count against the model, so a model that scores everything alike
gets no credit. Pairwise accuracy is over pairs (each pair counts once, as in
POLAR's paper); best-of-N and MRR are means over the records that rank
something: a *degenerate* record, whose responses are all equally right or all
equally wrong (no ordered pair: every one correct, none correct, one label for
all), is left out of both, since any pick is "best" (or none can be) whatever
the model does, and counted apart (``degenerate``). Intervals are a
percentile bootstrap over records with a fixed seed; a comparison resamples
the same records for both models (paired), and McNemar's exact test compares
the two models' pairwise outcomes pair by pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Resamples of the bootstrap and its seed: the same records give the same interval.
N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
# Below this many records a percentile bootstrap is too coarse to trust (one record: a zero-width
# "interval"); the report says so beside the intervals.
MIN_RECORDS_FOR_INTERVALS = 30
# Records a batch of resamples indexes at once (bounds the bootstrap's memory).
_RESAMPLE_CELLS = 2**22


@dataclass(frozen=True)
class Outcome:
    """One record's results.

    Attributes:
        pairs: Ordered pairs its values define.
        wins: Of those, the better response scored strictly higher.
        ties: Of those, both scored exactly alike.
        best: Best-of-N, 1.0 or 0.0.
        rr: Reciprocal rank of the first best response (0.0 without one).
        top_tied: Several responses share the top score.
        has_best: The record has a best response (always, except a group
            with no correct response).
        margins: Better minus worse score of each ordered pair.
        pair_wins: Won or not, per ordered pair (for McNemar's test).
    """

    pairs: int
    wins: int
    ties: int
    best: float
    rr: float
    top_tied: bool
    has_best: bool
    margins: tuple[float, ...]
    pair_wins: tuple[bool, ...]


# Chosen/rejected pairs as scoring sends them (chosen, rejected, chosen, ...): the
# training hook's accuracy and margin, the same win rule as a pair record's outcome here.

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


def best_responses(values: Sequence[float], kind: str) -> set[int]:
    """Indices of the best responses: the correct ones, or those of the highest label or score."""
    if kind == "correct":
        return {i for i, v in enumerate(values) if v}
    top = max(values)
    return {i for i, v in enumerate(values) if v == top}


def ordered_pairs(values: Sequence[float]) -> list[tuple[int, int]]:
    """(better, worse) index pairs: every i, j with values[i] > values[j], in index order."""
    return [(i, j) for i, vi in enumerate(values) for j, vj in enumerate(values) if vi > vj]


def outcome(scores: Sequence[float], values: Sequence[float], kind: str) -> Outcome:
    """The results of one record from its responses' scores and values (see the module's rules)."""
    if len(scores) != len(values):
        raise ValueError(f"{len(scores)} scores for {len(values)} responses")
    pairs = ordered_pairs([float(v) for v in values])
    margins = tuple(scores[i] - scores[j] for i, j in pairs)
    pair_wins = tuple(m > 0 for m in margins)
    best = best_responses(values, kind)
    top = max(scores)
    at_top = {i for i, s in enumerate(scores) if s == top}
    if best:
        best_score = max(scores[i] for i in best)
        rank = 1 + sum(1 for i, s in enumerate(scores) if i not in best and s >= best_score)
        rr = 1.0 / rank
    else:
        rr = 0.0
    return Outcome(pairs=len(pairs), wins=sum(pair_wins), ties=sum(m == 0 for m in margins),
                   best=1.0 if best and at_top <= best else 0.0, rr=rr, top_tied=len(at_top) > 1,
                   has_best=bool(best), margins=margins, pair_wins=pair_wins)


def _columns(outcomes: Sequence[Outcome]) -> dict[str, np.ndarray]:
    return {
        "wins": np.array([o.wins for o in outcomes], dtype=np.float64),
        "pairs": np.array([o.pairs for o in outcomes], dtype=np.float64),
        "best": np.array([o.best for o in outcomes], dtype=np.float64),
        "rr": np.array([o.rr for o in outcomes], dtype=np.float64),
        "ranked": np.array([o.pairs > 0 for o in outcomes], dtype=np.float64),
    }


def _statistics(cols: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Pairwise accuracy, best-of-N and MRR of each row of ``idx`` (resamples x record indices)."""
    pairs = cols["pairs"][idx].sum(-1)
    ranked = cols["ranked"][idx]
    n_ranked = ranked.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(pairs > 0, cols["wins"][idx].sum(-1) / pairs, np.nan)
        # degenerate records (nothing to rank) are left out of best-of-N and MRR
        best = np.where(n_ranked > 0, (cols["best"][idx] * ranked).sum(-1) / n_ranked, np.nan)
        rr = np.where(n_ranked > 0, (cols["rr"][idx] * ranked).sum(-1) / n_ranked, np.nan)
    return {"accuracy": accuracy, "best_of_n": best, "mrr": rr}


def _point(cols: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The statistics over all records (None where undefined: pairwise accuracy without a pair)."""
    out = {k: float(v[0]) for k, v in _statistics(cols, np.arange(len(cols["wins"]))[None, :]).items()}
    return {k: None if math.isnan(v) else v for k, v in out.items()}


def _resamples(n: int, n_bootstrap: int, seed: int):
    """Batches of bootstrap index rows, each row n draws with replacement (the same for the same seed)."""
    rng = np.random.default_rng(seed)
    per_batch = max(1, _RESAMPLE_CELLS // max(n, 1))
    done = 0
    while done < n_bootstrap:
        k = min(per_batch, n_bootstrap - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _interval(samples: np.ndarray) -> list[float] | None:
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return None
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return [float(lo), float(hi)]


def metrics(outcomes: Sequence[Outcome], n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Pairwise accuracy, best-of-N and MRR of records, each with a 95% bootstrap interval over records.

    Returns:
        ``accuracy`` (None without pairs), ``n`` (pairs), ``ties``, ``records``,
        ``best_of_n``, ``mrr`` (over the records that rank something; None
        without one), ``degenerate`` (records with no ordered pair, left out
        of both), ``top_ties`` (records whose top score is shared),
        ``without_best`` (records with no correct response), and
        ``accuracy_ci95``, ``best_of_n_ci95``, ``mrr_ci95`` when
        ``n_bootstrap`` > 0 (None for an undefined statistic).
    """
    out = {
        "records": len(outcomes),
        "n": sum(o.pairs for o in outcomes),
        "ties": sum(o.ties for o in outcomes),
        "top_ties": sum(o.top_tied for o in outcomes),
        "without_best": sum(not o.has_best for o in outcomes),
        "degenerate": sum(o.pairs == 0 for o in outcomes),
    }
    if not outcomes:
        return {**out, "accuracy": None, "best_of_n": None, "mrr": None}
    cols = _columns(outcomes)
    point = _point(cols)
    out.update(point)
    if n_bootstrap:
        parts = [_statistics(cols, idx) for idx in _resamples(len(outcomes), n_bootstrap, seed)]
        for k in point:
            out[f"{k}_ci95"] = _interval(np.concatenate([p[k] for p in parts]))
        if len(outcomes) < MIN_RECORDS_FOR_INTERVALS:
            out["ci95_warning"] = (f"from {len(outcomes)} record(s): a bootstrap over fewer than "
                                   f"{MIN_RECORDS_FOR_INTERVALS} records is not a reliable interval")
    return out


def paired_difference(this: Sequence[Outcome], other: Sequence[Outcome], n_bootstrap: int = N_BOOTSTRAP,
                      seed: int = BOOTSTRAP_SEED) -> dict:
    """This model minus the other on the same records, per metric, with a paired bootstrap interval.

    Both lists hold the same records in the same order; each resample takes
    the same records for both models, so what the records share cancels.

    Returns:
        Per metric (``accuracy``, ``best_of_n``, ``mrr``): ``{"this", "other",
        "difference", "ci95"}``.
    """
    if len(this) != len(other):
        raise ValueError(f"{len(this)} records against {len(other)}")
    a, b = _columns(this), _columns(other)
    pa, pb = _point(a), _point(b)
    out = {k: {"this": pa[k], "other": pb[k], "difference": None if pa[k] is None else pa[k] - pb[k]} for k in pa}
    if n_bootstrap and this:
        diffs: dict[str, list] = {k: [] for k in pa}
        for idx in _resamples(len(this), n_bootstrap, seed):
            sa, sb = _statistics(a, idx), _statistics(b, idx)
            for k in pa:
                diffs[k].append(sa[k] - sb[k])
        for k in pa:
            out[k]["ci95"] = None if pa[k] is None else _interval(np.concatenate(diffs[k]))
    return out


def mcnemar(this: Sequence[Outcome], other: Sequence[Outcome]) -> dict:
    """McNemar's exact test on the two models' pairwise outcomes, pair by pair.

    Returns:
        ``only_this`` (pairs this model wins and the other does not),
        ``only_other``, and ``p_value``: the two-sided exact binomial test of
        ``only_this`` among the discordant pairs against one half (1.0 with
        no discordant pair).
    """
    b = c = 0
    for x, y in zip(this, other):
        if x.pairs != y.pairs:
            raise ValueError("the two models' records define different pairs")
        for wx, wy in zip(x.pair_wins, y.pair_wins):
            b += wx and not wy
            c += wy and not wx
    if b + c == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(b, b + c, 0.5).pvalue)
    return {"only_this": b, "only_other": c, "p_value": min(p, 1.0)}


def disagreements(this: Sequence[Outcome], other: Sequence[Outcome]) -> list[int]:
    """Indices of the records on which the two models' outcomes differ (a pair, or the best-of-N pick)."""
    return [k for k, (x, y) in enumerate(zip(this, other)) if x.pair_wins != y.pair_wins or x.best != y.best]
