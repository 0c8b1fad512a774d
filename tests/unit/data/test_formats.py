"""polar_xtuner/data/formats.py: the ranked and policies readers give records or a record error, whatever the input (property tests)."""
import json

from hypothesis import given
from hypothesis import strategies as st

from polar_xtuner.data.formats import from_policies, from_ranked
from polar_xtuner.records import RecordError
from samples import FAST, fieldish, json_values, scalars


@FAST
@given(obj=json_values, responses=st.lists(st.fixed_dictionaries({"response": fieldish, "score": scalars}),
                                            max_size=5))
def test_ranked_reader_gives_records_or_a_record_error(obj, responses):
    for candidate in (obj, {"prompt": "q", "responses": responses}):
        try:
            out = list(from_ranked(candidate))
        except RecordError:
            continue
        for rec in out:
            assert {"prompt", "reference", "chosen", "rejected"} <= set(rec)
            json.dumps(rec, allow_nan=False)


@FAST
@given(obj=json_values, samples=st.lists(st.fixed_dictionaries({"policy": scalars, "response": fieldish}),
                                          max_size=6), k=st.integers(1, 4))
def test_policies_reader_gives_records_or_a_record_error(obj, samples, k):
    for candidate in (obj, {"prompt": "q", "samples": samples}):
        try:
            out = list(from_policies(candidate, pairs_per_prompt=k))
        except RecordError:
            continue
        assert len(out) <= k
