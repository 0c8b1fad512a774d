"""The data checker in-process (tools/build_dataset.py runs it in a subprocess in integration/data/test_build_dataset.py)."""
import json
import os

import pytest

from common import ASSETS, VAL
from polar_xtuner.data.check import OUTPUTS, build, expand_sources
from polar_xtuner.records import DataError

BAD = os.path.join(ASSETS, "bad_records.jsonl")


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_build_keeps_good_records_and_names_every_bad_one(tmp_path):
    out = tmp_path / "out"
    res = build([BAD, VAL], str(out), val_size=20, seed=3, progress=False)
    kept, rejected = _lines(out / "train.jsonl") + _lines(out / "val.jsonl"), _lines(out / "rejected.jsonl")
    assert res.kept == len(kept) and res.val == 20 and res.rejected == len(rejected) > 0
    assert all(r["source"] == BAD and r["line"] >= 1 and r["reason"] and "raw" in r for r in rejected)
    report = json.load(open(out / "report.json"))
    assert report["kept"] == res.kept and report["rejected"] == res.rejected
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)


def test_the_split_is_stable_for_a_seed(tmp_path):
    a = build([VAL], str(tmp_path / "a"), val_ratio=0.25, progress=False)
    b = build([VAL], str(tmp_path / "b"), val_ratio=0.25, progress=False)
    assert a.val == b.val > 0 and _lines(tmp_path / "a" / "val.jsonl") == _lines(tmp_path / "b" / "val.jsonl")


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_ratio=0.1, val_size=3), "mutually exclusive"),
    (dict(val_ratio=1.0), r"--val-ratio must be in \[0, 1\)"),
    (dict(drop_overlong=True), "--drop-overlong needs --tokenizer"),
    (dict(pairs_per_prompt=2), "applies to --from policies only"),
])
def test_conflicting_options_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        build([VAL], str(tmp_path / "o"), progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


def test_a_folder_of_foreign_files_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files this tool did not write"):
        build([VAL], str(out), progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_sources_expand_folders_and_name_a_missing_path(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("")
    (tmp_path / "d" / "b.txt").write_text("")
    assert expand_sources([str(tmp_path / "d")]) == [str(tmp_path / "d" / "a.jsonl")]
    with pytest.raises(DataError, match="nope"):
        expand_sources([str(tmp_path / "nope")])
