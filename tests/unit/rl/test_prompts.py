"""RL prompt files in-process (tools/make_rft_data.py runs them in a subprocess elsewhere)."""
import json

import pytest

from common import VAL
from polar_xtuner.records import load_records
from polar_xtuner.rl.prompts import rl_rows, write_rows


def test_verl_rows_carry_the_reference_as_ground_truth():
    rows, rejected = rl_rows([VAL], "verl", data_source="demo", split="val")
    records = load_records(VAL)
    assert rejected == [] and len(rows) == len(records)
    first = rows[0]
    assert first["data_source"] == "demo" and first["prompt"] == records[0]["prompt"]
    assert first["reward_model"] == {"style": "polar", "ground_truth": records[0]["reference"]}
    assert first["extra_info"]["split"] == "val" and [r["extra_info"]["index"] for r in rows[:3]] == [0, 1, 2]


def test_openrlhf_rows_carry_prompt_and_reference_in_the_label():
    rows, _ = rl_rows([VAL], "openrlhf")
    label = json.loads(rows[0]["label"])
    assert label == {"prompt": rows[0]["prompt"], "reference": load_records(VAL)[0]["reference"]}


def test_records_without_prompt_or_reference_are_named_and_left_out(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "q", "reference": "r"}\n{"prompt": "q"}\n[1]\nnot json\n')
    rows, rejected = rl_rows([str(src)], "verl")
    assert len(rows) == 1
    assert [line.split(": ", 1)[0] for line in rejected] == [f"{src}:2", f"{src}:3", f"{src}:4"]
    assert "missing field 'reference'" in rejected[0] and "JSON object" in rejected[1]
    with pytest.raises(ValueError, match="format must be one of"):
        rl_rows([str(src)], "trl")


def test_rows_are_written_whole_in_each_format(tmp_path):
    import datasets

    rows, _ = rl_rows([VAL], "verl")
    write_rows(rows[:5], str(tmp_path / "a.parquet"), "verl")
    back = datasets.Dataset.from_parquet(str(tmp_path / "a.parquet"))
    assert back.num_rows == 5 and back[0]["reward_model"]["ground_truth"] == rows[0]["reward_model"]["ground_truth"]
    rows, _ = rl_rows([VAL], "openrlhf")
    write_rows(rows[:3], str(tmp_path / "a.jsonl"), "openrlhf")
    assert [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()] == rows[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.parquet"]  # no temporary left
