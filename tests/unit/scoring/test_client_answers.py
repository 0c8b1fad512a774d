"""Property tests: the readers of every input format and the parsers of every server's answer.

Whatever bytes a data file holds and whatever JSON a server answers, the
readers and parsers give a result or the project's own error (one that names
the line, the field or the server), never another exception and never a hang:
each example runs under a deadline. They run in the unit tier (about 10 s).
"""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polar_xtuner.scoring.client import SERVER_TYPES, RemoteScoringError, parse_scores
from samples import FAST, json_values

def _answer(server_type, scores, order):
    if server_type == "sglang":
        return [{"embedding": [scores[i]], "index": i} for i in order]
    if server_type == "vllm":
        return {"data": [{"index": i, "data": [[0.0], [scores[i]]]} for i in order]}
    return {"data": [{"index": i, "data": scores[i]} for i in order]}


@FAST
@given(server_type=st.sampled_from(SERVER_TYPES), body=json_values, n=st.integers(0, 4))
def test_any_server_answer_is_scores_or_a_remote_error(server_type, body, n):
    try:
        out = parse_scores(server_type, body, n)
    except RemoteScoringError as e:
        assert server_type in str(e) or "score" in str(e)
        return
    assert len(out) == n and all(isinstance(s, float) and math.isfinite(s) for s in out)


@FAST
@given(server_type=st.sampled_from(SERVER_TYPES),
       scores=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=8), data=st.data())
def test_answers_in_any_order_are_matched_by_index(server_type, scores, data):
    order = data.draw(st.permutations(range(len(scores))))
    assert parse_scores(server_type, _answer(server_type, scores, order), len(scores)) == \
        pytest.approx(scores, abs=0)
