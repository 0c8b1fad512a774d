"""pair_metrics: the chosen/rejected maths every report and the training hook share."""
import math

import pytest

from polar_xtuner.eval.metrics import accuracy, interleave, mean_margin, unflatten, wins


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
