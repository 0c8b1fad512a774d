import json
import os

import pytest

from common import ASSETS
from polar_xtuner.records import DataError, RecordError, iter_records, load_records, validate_record

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
