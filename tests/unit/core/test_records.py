"""polar_xtuner/records.py: the record rules (each names its line and field), finite numbers, and the one reader's inputs."""
import gzip
import json
import math
import os
import subprocess
import threading

import pytest
from hypothesis import given, strategies as st

import polar_xtuner.records as records
from common import ASSETS, REPO
from polar_xtuner.data.formats import from_policies, from_ranked
from polar_xtuner.records import DataError, RecordError, finite_number, iter_records, load_records, validate_record
from samples import FAST, json_values, records as record_values


BAD = os.path.join(ASSETS, "bad_records.jsonl")

# line -> (code, field) for every rule; lines not listed here are valid.
EXPECTED = {
    2: ("invalid_json", None),
    3: ("not_object", None),
    4: ("missing_field", "reference"),
    5: ("null_field", "chosen"),
    6: ("bad_type", "rejected"),
    7: ("bad_message", "prompt"),
    8: ("bad_message", "reference"),
    9: ("empty_content", "chosen"),
    10: ("chosen_equals_rejected", "chosen"),
    13: ("empty_content", "chosen"),
    14: ("bad_message", "prompt"),
}


def test_every_rule_reports_its_line_and_field():
    items = list(iter_records(BAD))
    errors = {it.line: (it.error.code, it.error.field) for it in items if it.error}
    assert errors == EXPECTED
    # the field is named in the human-readable reason too
    for it in items:
        if it.error is not None and it.error.field:
            assert it.error.field in it.error.reason


def test_mixed_file_keeps_every_good_record():
    items = list(iter_records(BAD))
    good_lines = [it.line for it in items if it.record is not None]
    assert good_lines == [1, 12, 15]  # blank line 11 is not a record


def test_string_field_becomes_one_message_and_extra_keys_are_kept():
    rec = validate_record({"prompt": "Q?", "reference": "A.", "chosen": "A!", "rejected": "B.",
                           "source": "s", "category": "c", "id": 7})
    assert rec["prompt"] == [{"role": "user", "content": "Q?"}]
    assert rec["chosen"] == [{"role": "assistant", "content": "A!"}]
    assert (rec["source"], rec["category"], rec["id"]) == ("s", "c", 7)


def test_prompt_string_is_not_iterated_by_character():
    rec = validate_record({"prompt": "abc", "reference": "r", "chosen": "c", "rejected": "x"})
    assert len(rec["prompt"]) == 1


def test_load_records_names_file_and_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_records(BAD)
    msg = str(e.value)
    assert "11 invalid record(s)" in msg
    assert f"{BAD}:2: invalid JSON" in msg
    assert f"{BAD}:3: record must be a JSON object" in msg


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="is a directory"):
        list(iter_records(str(tmp_path)))


def test_non_utf8_line_is_rejected_with_its_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "q", "reference": "r", "chosen": "c", "rejected": "x"}).encode()
    p.write_bytes(good + b"\n\xff\xfe\n" + good + b"\r\n")
    items = list(iter_records(str(p)))
    assert [(it.line, it.error.code if it.error else None) for it in items] == [
        (1, None), (2, "not_utf8"), (3, None)]


def test_record_error_is_a_value_error():
    assert issubclass(RecordError, ValueError)
    # callers that know only ValueError catch it, and it is still the typed error with its field
    with pytest.raises(ValueError) as e:
        validate_record({"prompt": "x"})
    assert type(e.value) is RecordError and e.value.code == "missing_field"


@pytest.mark.parametrize("margin", [True, "1.0", None, [1], float("nan"), float("inf")])
def test_bad_margin_is_refused_with_its_field(margin):
    rec = {"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b", "margin": margin}
    with pytest.raises(RecordError) as e:
        validate_record(rec)
    assert (e.value.field, e.value.code) == ("margin", "bad_margin")


def test_numeric_margin_is_kept():
    for m in (0, 1.5, -0.5):
        assert validate_record({"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b",
                                "margin": m})["margin"] == m


@pytest.mark.parametrize("text, says", [
    ('{"a": 1, "a": 2}', "the key 'a' appears twice"), ("[1, 2]", "expected a JSON object"),
    ("{", "Expecting"), ("", "Expecting value"),
])
def test_the_one_settings_reader_refuses_what_has_no_single_meaning(text, says, tmp_path):
    from polar_xtuner.encoding import EncodingSettings
    from polar_xtuner.rl.reward import RFTConfigError, RFTSettings
    from polar_xtuner.records import read_settings

    path = tmp_path / "polar_encoding.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=says):
        read_settings(str(path))
    with pytest.raises(ValueError, match=f"{path}: unreadable encoding settings.*{says}"):
        EncodingSettings.from_model_dir(str(tmp_path))
    with pytest.raises(RFTConfigError, match=f"POLAR_CONFIG={path}: cannot read it.*{says}"):
        RFTSettings.from_env({"POLAR_CONFIG": str(path)})


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


VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def _records(path):
    return [item.record for item in iter_records(path)]


def _fifo_fed(tmp_path, name, payload: bytes):
    """A FIFO whose writer (a thread) sends ``payload`` once a reader opens it."""
    fifo = tmp_path / name
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(payload)

    threading.Thread(target=write, daemon=True).start()
    return str(fifo)


@pytest.mark.parametrize("name, encode", [("val.jsonl", lambda b: b), ("val.jsonl.gz", gzip.compress),
                                          ("val.json", None)])
def test_a_fifo_gives_every_record_a_file_gives(tmp_path, name, encode):
    want = _records(VAL)
    raw = open(VAL, "rb").read()
    if encode is None:  # a JSON array
        import json

        raw = json.dumps([json.loads(line) for line in raw.decode().splitlines()]).encode()
        encode = lambda b: b  # noqa: E731
    assert _records(_fifo_fed(tmp_path, name, encode(raw))) == want and len(want) == 200


def test_a_pipe_through_dev_stdin_and_process_substitution_lose_nothing():
    """The issue's cases: `<(cat val.jsonl)` and `cat | ... /dev/stdin` (the sniff used to eat the first 4 KiB)."""
    code = ("import sys; from polar_xtuner.records import iter_records; "
            "print(sum(1 for _ in iter_records(sys.argv[1])))")
    out = subprocess.run(["bash", "-c", f'python -c "{code}" <(cat {VAL}); cat {VAL} | python -c "{code}" /dev/stdin'],
                         capture_output=True, text=True, env=dict(os.environ, PATH=os.path.dirname(
                             __import__("sys").executable) + os.pathsep + os.environ["PATH"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["200", "200"]


def test_a_fifo_with_no_writer_fails_in_one_named_line(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "STREAM_FIRST_BYTE_TIMEOUT_S", 0.3)
    fifo = tmp_path / "lonely.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="lonely.jsonl: a pipe or FIFO that gave nothing within 0.3 s"):
        list(iter_records(str(fifo)))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_device_is_refused_before_anything_is_read(device):
    with pytest.raises(DataError, match=f"{device}: is a terminal or character device, not a data file"):
        list(iter_records(device))


def test_a_line_past_the_limit_names_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_bytes(open(VAL, "rb").readline() + b"x" * 5000)  # a line with no end, as /dev/zero
    with pytest.raises(DataError, match=r"long.jsonl:2: a line of more than"):
        list(iter_records(str(path)))


def test_parquet_from_a_stream_is_refused_and_training_takes_files_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "reference": ["r"], "chosen": ["a"], "rejected": ["b"]}), table)
    assert len(_records(str(table))) == 1
    with pytest.raises(DataError, match="Parquet is read from its end"):
        list(iter_records(_fifo_fed(tmp_path, "t2.parquet", table.read_bytes())))
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="training reads its data on every rank"):
        records.require_regular_file(str(fifo), "training reads its data on every rank and keys its cache by the content")


@pytest.mark.parametrize("tool", ["eval_pref", "build_dataset", "make_rft_data"])
def test_every_tool_reads_a_fifo_whole(tool, tiny_dir, tmp_path, monkeypatch, capsys):
    """Each tool that reads data, through its main(): the counts it reports are the file's."""
    import json

    from common import load_tool

    monkeypatch.chdir(tmp_path)
    fifo = _fifo_fed(tmp_path, "in.jsonl", open(VAL, "rb").read())
    if tool == "eval_pref":
        assert load_tool(tool).main(["--model", tiny_dir, "--data", fifo, "--out", "r.json"]) == 0
        assert json.load(open("r.json"))["records"] == 200
    elif tool == "build_dataset":
        assert load_tool(tool).main([fifo, "-o", "out"]) == 0
        assert sum(1 for _ in open("out/train.jsonl")) == 200
    else:  # the same prompts as from the file itself
        assert load_tool(tool).main([fifo, "-o", "rl.jsonl"]) == 0
        assert load_tool(tool).main([VAL, "-o", "rl_file.jsonl"]) == 0
        assert open("rl.jsonl").read() == open("rl_file.jsonl").read() and os.path.getsize("rl.jsonl") > 0
    capsys.readouterr()


@FAST
@given(obj=st.one_of(record_values, json_values))
def test_validate_record_returns_a_record_or_a_record_error(obj):
    try:
        out = validate_record(obj)
    except RecordError as e:
        assert e.reason and e.code
        return
    assert {"prompt", "reference", "chosen", "rejected"} <= set(out)
    json.dumps(out, allow_nan=False)  # what is kept is strict JSON again


@FAST
@given(lines=st.lists(st.one_of(st.binary(max_size=40), record_values.map(lambda r: json.dumps(r).encode())), max_size=6),
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
