"""Every number in every input format is a finite JSON number, or the record is refused naming its field.

Python's json reads NaN, Infinity and -Infinity, and a bool is an int in
Python: without these rules a `"score": NaN` became a ranked record's
reference (NaN sorts anywhere) and a NaN in a kept key was written back out as
invalid JSON.
"""
import json
import math

import pytest

from polar_xtuner.data.formats import from_policies, from_ranked
from polar_xtuner.records import RecordError, finite_number, iter_records, validate_record

BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), True, "8.5", None, [1], {"v": 1}]
GOOD = {"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b"}


def _ranked(score):
    return {"prompt": "q", "responses": [{"response": "a", "score": 3}, {"response": "b", "score": score},
                                         {"response": "c", "score": 1}]}


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_a_ranked_score_that_is_not_a_finite_number_names_the_response(value):
    with pytest.raises(RecordError) as e:
        list(from_ranked(_ranked(value)))
    assert e.value.field == "responses" and "'responses[1].score' must be a finite number" in e.value.reason


def test_a_nan_top_score_no_longer_becomes_the_reference():
    """As read from a file: the NaN literal parses, then the rule refuses it."""
    obj = json.loads('{"prompt": "q", "responses": [{"response": "nan", "score": NaN}, '
                     '{"response": "b", "score": 2}, {"response": "c", "score": 1}]}')
    assert math.isnan(obj["responses"][0]["score"])
    with pytest.raises(RecordError, match=r"responses\[0\]\.score.*NaN"):
        list(from_ranked(obj))


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_a_margin_that_is_not_a_finite_number_is_refused(value):
    with pytest.raises(RecordError) as e:
        validate_record({**GOOD, "margin": value})
    assert (e.value.field, e.value.code) == ("margin", "bad_margin")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=repr)
@pytest.mark.parametrize("where", ["polar", "ranked", "policies"])
def test_non_finite_numbers_in_kept_keys_are_refused_with_their_path(value, where):
    meta = {"meta": {"weights": [1.0, value]}}
    with pytest.raises(RecordError) as e:
        if where == "polar":
            validate_record({**GOOD, **meta})
        elif where == "ranked":
            list(from_ranked({**_ranked(2), **meta}))
        else:
            list(from_policies({"prompt": "q", "samples": [{"policy": "p", "response": "a"},
                                                           {"policy": "p", "response": "b"},
                                                           {"policy": "q", "response": "c"}], **meta}))
    assert e.value.field == "meta" and "'meta.weights[1]'" in e.value.reason


def test_finite_numbers_and_other_kept_values_pass():
    assert validate_record({**GOOD, "margin": 0.5, "meta": {"w": [1, 2.5, "x", None]}})["margin"] == 0.5
    assert finite_number(3, "score") == 3.0 and finite_number(-2.5, "score") == -2.5
    assert len(list(from_ranked(_ranked(2.0)))) == 1


def test_a_nan_literal_read_from_a_line_is_refused_with_its_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "margin": float("nan")}) + "\n")  # NaN literal
    item = list(iter_records(str(path)))[1]
    assert item.where.endswith("data.jsonl:2")
    assert item.record is None and item.error.field == "margin" and "NaN" in item.error.reason
