"""Ranking metrics on hand-checked groups, their bootstrap intervals, and the paired comparison."""
import math

import pytest

from polar_xtuner.eval.metrics import mcnemar, metrics, outcome, paired_difference
from polar_xtuner.eval.metrics import accuracy, interleave, mean_margin, unflatten, wins
from polar_xtuner.eval.report import comparison, format_report, ranking_report


def test_a_labelled_group_by_hand():
    # labels 2 > 1 > 0 define 3 ordered pairs; scores rank 0 > 2 > 1, so (0,1) and (0,2) win, (1,2) loses
    o = outcome([3.0, 1.0, 2.0], [2, 1, 0], "label")
    assert (o.pairs, o.wins, o.ties) == (3, 2, 0)
    assert o.best == 1.0 and o.rr == 1.0 and not o.top_tied
    assert sorted(o.margins) == [-1.0, 1.0, 2.0]


def test_best_of_n_and_reciprocal_rank_with_correct_flags():
    # correct: 1 and 3; scores rank 0 (wrong) first, then 3 (correct): best-of-N 0, first correct at rank 2
    o = outcome([5.0, 1.0, 0.0, 4.0], [False, True, False, True], "correct")
    assert o.best == 0.0 and o.rr == pytest.approx(1 / 2)
    assert (o.pairs, o.wins) == (4, 2)  # (1,0) (1,2) (3,0) (3,2): 1 beats 2, 3 beats 2
    o = outcome([5.0, 6.0, 0.0, 4.0], [False, True, False, True], "correct")
    assert o.best == 1.0 and o.rr == 1.0


def test_ties_count_against_the_model():
    # the top score is shared by a correct and a wrong response: not a pick of the best
    o = outcome([2.0, 2.0, 1.0], [True, False, False], "correct")
    assert o.best == 0.0 and o.top_tied and o.rr == pytest.approx(1 / 2)
    assert (o.wins, o.ties) == (1, 1)
    # a model that scores everything alike gets nothing
    flat = outcome([0.5] * 4, [3, 2, 1, 0], "score")
    assert flat.wins == 0 and flat.ties == 6 and flat.best == 0.0 and flat.rr == pytest.approx(1 / 4)
    # two correct responses tied at the top is still a correct pick
    assert outcome([2.0, 2.0, 1.0], [True, True, False], "correct").best == 1.0


def test_all_correct_and_none_correct_groups():
    every = outcome([0.1, 0.9, 0.5], [True, True, True], "correct")
    assert (every.pairs, every.best, every.rr, every.has_best) == (0, 1.0, 1.0, True)
    none = outcome([0.1, 0.9, 0.5], [False, False, False], "correct")
    assert (none.pairs, none.best, none.rr, none.has_best) == (0, 0.0, 0.0, False)
    m = metrics([every, none], n_bootstrap=0)
    # neither ranks anything: both left out of best-of-N and MRR, counted apart (no free hit, no free miss)
    assert m["best_of_n"] is None and m["mrr"] is None and m["accuracy"] is None
    assert m["degenerate"] == 2 and m["without_best"] == 1
    ranked = outcome([0.9, 0.1], [True, False], "correct")
    m = metrics([every, none, ranked, outcome([0.1, 0.9], [True, False], "correct")], n_bootstrap=200)
    assert (m["best_of_n"], m["mrr"], m["degenerate"]) == (0.5, 0.75, 2)  # over the two ranked records only
    assert m["best_of_n_ci95"][0] >= 0.0 and m["best_of_n_ci95"][1] <= 1.0


def test_an_untrained_model_gets_no_best_of_n_from_degenerate_groups():
    """The issue's case: pair accuracy 0.00 but best-of-N 0.50 from a group whose responses are all correct."""
    wrong_pair = outcome([0.1, 0.9], [1, 0], "label")  # the model picks the worse answer
    all_correct = outcome([0.4, 0.6], [True, True], "correct")
    all_equal = outcome([0.3, 0.2, 0.1], [2, 2, 2], "label")
    m = metrics([wrong_pair, all_correct, all_equal], n_bootstrap=0)
    assert m["accuracy"] == 0.0 and m["best_of_n"] == 0.0 and m["mrr"] == 0.5 and m["degenerate"] == 2


def test_a_report_without_pairs_is_strict_json():
    """Every group all correct: no ordered pair, so pairwise figures are null, not NaN (eval_pref's --out)."""
    import json

    recs = [{"responses": [{"response": "a", "correct": True}, {"response": "b", "correct": True}]}]
    report = ranking_report([[0.2, 0.1]], recs)
    report["compare"] = {"other": "x", **comparison([[0.2, 0.1]], [[0.1, 0.2]], recs, ["f:1"])}
    json.dumps(report, allow_nan=False)
    assert report["accuracy"] is None and report["margin"]["mean"] is None and report["best_of_n"] is None
    assert report["degenerate"] == 1
    assert report["compare"]["difference"]["accuracy"] == {"this": None, "other": None, "difference": None,
                                                          "ci95": None}
    assert "accuracy    n/a" in format_report(report)


def test_pairs_are_two_response_groups():
    scores = [(2.0, 1.0), (0.5, 1.5), (1.0, 1.0), (3.0, 0.0)]
    r = ranking_report(scores, [{}] * 4, n_bootstrap=0)
    assert (r["n"], r["records"], r["ties"]) == (4, 4, 1)
    assert r["accuracy"] == r["best_of_n"] == 0.5
    assert r["mrr"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)


def test_pairwise_accuracy_is_over_pairs_best_of_n_over_records():
    records = [{"responses": [{"response": "a", "label": v} for v in (2, 1, 0)]},
               {"responses": [{"response": "a", "correct": True}, {"response": "b", "correct": False}]}]
    r = ranking_report([[3.0, 1.0, 2.0], [0.0, 1.0]], records, n_bootstrap=0)
    assert r["n"] == 4 and r["accuracy"] == pytest.approx(2 / 4)
    assert r["best_of_n"] == pytest.approx(1 / 2) and r["mrr"] == pytest.approx((1 + 1 / 2) / 2)


def _records(n, seed=0):
    import random

    rng = random.Random(seed)
    recs, scores = [], []
    for _ in range(n):
        recs.append({"responses": [{"response": "x", "correct": c} for c in (True, False, False, False)]})
        scores.append([rng.gauss(0.6, 1), rng.gauss(0, 1), rng.gauss(0, 1), rng.gauss(0, 1)])
    return recs, scores


def test_bootstrap_intervals_shrink_as_records_grow_and_repeat_with_the_seed():
    widths = []
    for n in (40, 400, 4000):
        recs, scores = _records(n)
        r = ranking_report(scores, recs)
        for key in ("accuracy", "best_of_n", "mrr"):
            lo, hi = r[f"{key}_ci95"]
            assert lo <= r[key] <= hi
        widths.append(r["best_of_n_ci95"][1] - r["best_of_n_ci95"][0])
        again = ranking_report(scores, recs)
        assert again["best_of_n_ci95"] == r["best_of_n_ci95"] and again["accuracy_ci95"] == r["accuracy_ci95"]
    assert widths[0] > widths[1] > widths[2] > 0
    # about 1/sqrt(n): 100x the records, about a tenth of the width
    assert 0.05 < widths[2] / widths[0] < 0.2
    recs, scores = _records(400)
    assert ranking_report(scores, recs, seed=1)["best_of_n_ci95"] != ranking_report(scores, recs)["best_of_n_ci95"]


def test_a_model_compared_with_itself_differs_by_zero():
    recs, scores = _records(200)
    c = comparison(scores, scores, recs, [f"f:{i}" for i in range(200)])
    for d in c["difference"].values():
        assert d["difference"] == 0.0 and d["ci95"] == [0.0, 0.0]
    assert c["mcnemar"] == {"only_this": 0, "only_other": 0, "p_value": 1.0}
    assert c["disagreements"] == []


def test_comparison_names_the_records_that_differ_and_tests_the_pairs():
    recs, scores = _records(300)
    worse = [list(s) for s in scores]
    for k in range(0, 300, 3):  # every third record: the correct response drops to the bottom
        worse[k][0] = min(worse[k]) - 1
    c = comparison(scores, worse, recs, [f"f:{i}" for i in range(300)])
    d = c["difference"]["best_of_n"]
    assert d["difference"] > 0 and d["ci95"][0] > 0  # the gain is clear of zero
    assert c["mcnemar"]["only_other"] == 0 and c["mcnemar"]["only_this"] > 0 and c["mcnemar"]["p_value"] < 1e-6
    assert {x["where"] for x in c["disagreements"]} <= {f"f:{k}" for k in range(0, 300, 3)}
    assert c["disagreements"] and all(x["this"] != x["other"] for x in c["disagreements"])


def test_mcnemar_by_hand():
    # 3 pairs won only by this model, 1 only by the other: exact two-sided p = 2 * P(X <= 1), X ~ Bin(4, 1/2)
    a = [outcome([1.0, 0.0], [1, 0], "label")] * 3 + [outcome([0.0, 1.0], [1, 0], "label")]
    b = [outcome([0.0, 1.0], [1, 0], "label")] * 3 + [outcome([1.0, 0.0], [1, 0], "label")]
    assert mcnemar(a, b) == {"only_this": 3, "only_other": 1, "p_value": pytest.approx(2 * 5 / 16)}
    assert paired_difference(a, b, n_bootstrap=0)["accuracy"]["difference"] == pytest.approx(0.5)


def test_breakdowns_and_the_printed_table():
    recs, scores = _records(20)
    for k, r in enumerate(recs):
        r["subset"] = "Math" if k % 2 else "Ties"
    report = ranking_report(scores, recs)
    assert set(report["by_subset"]) == {"Math", "Ties"}
    assert report["by_subset"]["Math"]["records"] == 10 and "best_of_n_ci95" in report["by_subset"]["Math"]
    report["compare"] = {"other": "base", **comparison(scores, scores, recs, [str(i) for i in range(20)])}
    text = format_report(report)
    assert "best-of-N" in text and "MRR" in text and "by subset:" in text and "against base:" in text


def test_interleave_and_unflatten_are_inverse():
    pairs = [(1.0, 0.5), (0.2, 0.4), (3, 3)]
    flat = interleave(pairs)
    assert flat == [1.0, 0.5, 0.2, 0.4, 3, 3] and unflatten(flat) == pairs


def test_an_odd_count_is_an_error_not_a_dropped_score():
    with pytest.raises(ValueError, match="3 scores cannot be chosen/rejected pairs"):
        unflatten([1, 2, 3])


def test_a_tie_is_not_a_win():
    pairs = [(1.0, 0.5), (0.2, 0.4), (3.0, 3.0), (2.0, -1.0)]
    assert wins(pairs) == 2 and accuracy(pairs) == 0.5
    assert mean_margin(pairs) == pytest.approx((0.5 - 0.2 + 0 + 3.0) / 4)


def test_no_pairs_is_nan_not_zero():
    assert math.isnan(accuracy([])) and math.isnan(mean_margin([]))
