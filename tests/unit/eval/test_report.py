"""Scores, padding sides, and the preference report."""
import pytest

from polar_xtuner.eval.report import preference_report


def test_report_numbers_on_a_hand_computed_case():
    scores = [(2.0, 1.0), (0.5, 1.5), (1.0, 1.0), (3.0, 0.0)]
    recs = [{"category": "a"}, {"category": "a"}, {"category": "b"}, {"category": "b"}]
    r = preference_report(scores, recs, n_bootstrap=200)
    assert r["n"] == 4 and r["ties"] == 1
    assert r["accuracy"] == pytest.approx(0.5)  # ties do not count as wins
    assert r["margin"]["mean"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert r["margin"]["q50"] == pytest.approx(0.5)  # median of -1, 0, 1, 3
    got = {k: {f: v[f] for f in ("accuracy", "n", "ties")} for k, v in r["by_category"].items()}
    assert got == {"a": {"accuracy": 0.5, "n": 2, "ties": 0}, "b": {"accuracy": 0.5, "n": 2, "ties": 1}}
    lo, hi = r["accuracy_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


