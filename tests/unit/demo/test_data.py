"""The demo data in-process: valid records, seeded, held-out val, answerable only through the reference."""
import json

from polar_xtuner.demo.data import TOPICS, generate, with_margins, write_demo_data
from polar_xtuner.records import join_contents, load_records, validate_record


def test_records_are_valid_and_seeded():
    a, b = list(generate(50, 7)), list(generate(50, 7))
    assert a == b and a != list(generate(50, 8))
    for rec in a:
        validate_record(rec)


def test_the_chosen_answer_is_the_references_and_the_rejected_another_of_the_topic():
    for rec in generate(200, 0):
        answers = TOPICS[rec["category"]][0]
        named = {part: [a for a in answers if a in join_contents(rec[part])] for part in ("reference", "chosen",
                                                                                          "rejected")}
        assert named["reference"] and named["chosen"] and named["rejected"]
        assert set(named["chosen"]) == set(named["reference"]) and not set(named["rejected"]) & set(named["reference"])


def test_demo_files_are_written_with_a_held_out_val(tmp_path):
    counts = write_demo_data(str(tmp_path), 40, 10, seed=3)
    train, val = load_records(str(tmp_path / "train.jsonl")), load_records(str(tmp_path / "val.jsonl"))
    assert counts == {"train": 40, "val": 10} and len(train) == 40 and len(val) == 10
    assert not {json.dumps(r, sort_keys=True) for r in val} & {json.dumps(r, sort_keys=True) for r in train}


def test_margins_mark_strong_and_weak_pairs():
    margins = {rec["margin"] for rec in with_margins(generate(100, 0))}
    assert margins == {2.0, 0.5}
