"""Property tests: the readers of every input format and the parsers of every server's answer.

Whatever bytes a data file holds and whatever JSON a server answers, the
readers and parsers give a result or the project's own error (one that names
the line, the field or the server), never another exception and never a hang:
each example runs under a deadline. They run in the unit tier (about 10 s).
"""
import gzip
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_xtuner.scoring.client import SERVER_TYPES, RemoteScoringError, parse_scores
from polar_xtuner.data.formats import from_policies, from_ranked
from polar_xtuner.records import DataError, RecordError, iter_records, validate_record

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", ""]),
                                           "content": st.text(max_size=30)}), max_size=3)
fieldish = st.one_of(st.text(max_size=30), messages, scalars)
records = st.fixed_dictionaries({}, optional={k: fieldish for k in ("prompt", "reference", "chosen", "rejected")}
                                ).flatmap(lambda d: st.dictionaries(st.text(max_size=6), json_values, max_size=2)
                                          .map(lambda extra: {**extra, **d}))


@FAST
@given(obj=st.one_of(records, json_values))
def test_validate_record_returns_a_record_or_a_record_error(obj):
    try:
        out = validate_record(obj)
    except RecordError as e:
        assert e.reason and e.code
        return
    assert {"prompt", "reference", "chosen", "rejected"} <= set(out)
    json.dumps(out, allow_nan=False)  # what is kept is strict JSON again


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


@FAST
@given(lines=st.lists(st.one_of(st.binary(max_size=40), records.map(lambda r: json.dumps(r).encode())), max_size=6),
       gz=st.booleans(), ext=st.sampled_from([".jsonl", ".json"]))
def test_any_bytes_in_a_data_file_are_read_line_by_line_or_refused(tmp_path_factory, lines, gz, ext):
    path = tmp_path_factory.mktemp("prop") / f"data{ext}{'.gz' if gz else ''}"
    raw = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    try:
        items = list(iter_records(str(path)))
    except DataError as e:
        assert str(path) in str(e)
        return
    for item in items:
        assert (item.record is None) != (item.error is None)
        assert item.line >= 1 and item.source == str(path)


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
