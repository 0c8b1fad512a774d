"""tools/eval_pref.py in its own process: groups and benchmarks in one report, --compare, --plot, one-line refusals, shared prefixes by default."""
import json
import os

import pytest

from common import ASSETS, REPO, VAL, run_tool


pytestmark = pytest.mark.integration  # runs tools/eval_pref.py in a subprocess

BENCH = os.path.join(ASSETS, "benchmarks")


def _eval(*args):
    return run_tool("python", "tools/eval_pref.py", *args, timeout=300)


def test_groups_report_best_of_n_and_compare_with_a_model_and_with_saved_scores(tiny_dir, tmp_path):
    data = os.path.join(BENCH, "groups.jsonl")
    proc = _eval("--model", tiny_dir, "--data", data, "--out", str(tmp_path / "r.json"),
                 "--save-scores", str(tmp_path / "s.jsonl"), "--compare", tiny_dir,
                 "--plot", str(tmp_path / "both.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.load(open(tmp_path / "r.json"))
    assert report["records"] == 3 and report["n"] == 3 + 1 + 3  # labels 3>2>0, correct>wrong, scores .9>.2>.1
    for key in ("accuracy", "best_of_n", "mrr"):
        lo, hi = report[f"{key}_ci95"]
        assert lo <= report[key] <= hi
        d = report["compare"]["difference"][key]
        assert d["difference"] == 0.0 and d["ci95"] == [0.0, 0.0]  # a model against itself
    assert report["compare"]["disagreements"] == [] and report["compare"]["mcnemar"]["p_value"] == 1.0
    assert set(report["by_source"]) == {"math", "science", "food"}
    assert "best-of-N" in proc.stdout and "against" in proc.stdout
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    rows = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    assert [len(r["scores"]) for r in rows] == [3, 2, 3] and [r["line"] for r in rows] == [1, 2, 3]

    # the same records read back from the saved scores, scored whole this time: the same figures
    proc = _eval("--model", tiny_dir, "--data", data, "--out", str(tmp_path / "r2.json"), "--no-shared-prefix",
                 "--compare", str(tmp_path / "s.jsonl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.load(open(tmp_path / "r2.json"))
    assert again["shared_prefix"] is False
    for key in ("accuracy", "best_of_n", "mrr"):
        assert again[key] == report[key] and abs(again["compare"]["difference"][key]["difference"]) < 1e-9


@pytest.mark.parametrize("args, message", [
    (["--data", f"{BENCH}/rewardbench2.jsonl", "--format", "rewardbench2"],
     "RewardBench 2 has no reference answers; pass --references"),
    (["--data", f"{BENCH}/rewardbench2.jsonl", "--format", "rewardbench2", "--references", f"{BENCH}/r.jsonl"],
     "--references"),
    (["--data", f"{BENCH}/groups.jsonl", "--format", "rewardbench"], "invalid choice: 'rewardbench'"),
    (["--data", f"{BENCH}/ppe_ifeval.jsonl", "--format", "ppe"], "ppe_ifeval.jsonl:1: "),
    (["--data", VAL, "--compare", f"{BENCH}/groups.jsonl"], "groups.jsonl:1: not a line of eval_pref's --save-scores"),
    (["--data", VAL, "--server-type", "vllm", "--compare", "TINY"], "pass --compare-server-address HOST:PORT"),
    (["--data", VAL, "--compare-server-address", "127.0.0.1:1"], "--compare-server-address needs --server-type"),
])
def test_bad_inputs_fail_with_one_line_and_exit_2(tiny_dir, args, message):
    proc = _eval("--model", tiny_dir, *[tiny_dir if a == "TINY" else a for a in args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert message in lines[-1] and "Traceback" not in proc.stderr


def test_one_response_groups_and_copied_references_are_refused(tiny_dir, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "p", "reference": "r", "responses": [{"response": "a", "label": 1}]}) + "\n")
    copied = tmp_path / "refs.jsonl"
    copied.write_text("".join(json.dumps({"id": i, "reference": r}) + "\n" for i, r in
                              [("42", "x"), ("7", "William Shakespeare wrote Hamlet."), ("tied:3", "y")]))
    for args, message in [(["--data", str(one)], "one.jsonl:1: 'responses' holds 1 response(s)"),
                          (["--data", f"{BENCH}/rewardbench2.jsonl", "--format", "rewardbench2", "--references",
                            str(copied)], "rewardbench2.jsonl:2: the reference is identical to response 1")]:
        proc = _eval("--model", tiny_dir, *args, "--out", str(tmp_path / "r.json"))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
        assert message in proc.stderr and not (tmp_path / "r.json").exists()


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
