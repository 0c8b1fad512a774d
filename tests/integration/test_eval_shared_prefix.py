"""tools/eval_pref.py scores locally with shared prefixes by default; --no-shared-prefix gives the same scores."""
import json
import os

import pytest

from common import REPO, run_tool

pytestmark = pytest.mark.integration  # runs tools/eval_pref.py in a subprocess

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def test_eval_pref_shares_prefixes_and_the_scores_equal_the_unshared(tiny_dir, tmp_path):
    runs = {}
    for name, extra in (("shared", []), ("whole", ["--no-shared-prefix"])):
        proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", VAL, *extra,
                        "--out", str(tmp_path / f"{name}.json"), "--save-scores", str(tmp_path / f"{name}.jsonl"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.load(open(tmp_path / f"{name}.json"))
        scores = [(r["chosen"], r["rejected"]) for r in map(json.loads, open(tmp_path / f"{name}.jsonl"))]
        runs[name] = report, scores
    assert runs["shared"][0]["shared_prefix"] is True and runs["whole"][0]["shared_prefix"] is False
    a, b = runs["shared"][1], runs["whole"][1]
    assert len(a) == len(b) == 200
    assert max(abs(x - y) / max(1.0, abs(y)) for p, q in zip(a, b) for x, y in zip(p, q)) <= 1e-5
