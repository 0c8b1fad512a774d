"""tools/build_dataset.py: nothing lost, clear errors, deterministic splits, length statistics."""
import json
import os

import pytest

from common import ASSETS, REPO, run_tool


pytestmark = pytest.mark.integration  # every test runs tools/build_dataset.py in a subprocess

BAD = os.path.join(ASSETS, "bad_records.jsonl")
UNI = os.path.join(ASSETS, "unicode_records.jsonl")
VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_mixed_input_keeps_good_and_reports_every_bad_line(tmp_path):
    out = tmp_path / "out"
    proc = run_tool("python", "tools/build_dataset.py", BAD, VAL, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    kept, rejected = _lines(out / "train.jsonl"), _lines(out / "rejected.jsonl")
    assert len(kept) == 3 + 200 and len(rejected) == 11
    assert [r["line"] for r in rejected] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14]
    assert all(r["source"] == BAD and r["reason"] and "raw" in r for r in rejected)
    assert rejected[2]["field"] == "reference" and "'reference'" in rejected[2]["reason"]
    # a plain-string prompt is normalised into one message, extra keys kept
    assert {"role": "user", "content": "What is the capital of China?"} == kept[1]["prompt"][0]
    assert kept[1]["source"] == "plain-string"
    report = json.load(open(out / "report.json"))
    assert report["kept"] == 203 and report["rejected"] == 11
    assert report["rejected_by_reason"]["bad_message"] == 3
    assert "rejected 11" in proc.stdout


def test_val_split_is_deterministic_and_disjoint(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_tool("python", "tools/build_dataset.py", VAL, "-o", str(out), "--val-size", "20", "--seed", "3")
        assert proc.returncode == 0, proc.stderr
        runs.append((_lines(out / "train.jsonl"), _lines(out / "val.jsonl")))
    (train_a, val_a), (train_b, val_b) = runs
    assert val_a == val_b and train_a == train_b and len(val_a) == 20 and len(train_a) == 180
    ids = lambda recs: {r["id"] for r in recs}  # noqa: E731
    assert not ids(val_a) & ids(train_a)

    out = tmp_path / "ratio"
    run_tool("python", "tools/build_dataset.py", VAL, "-o", str(out), "--val-ratio", "0.25")
    n_val = len(_lines(out / "val.jsonl"))
    assert 20 <= n_val <= 80 and n_val + len(_lines(out / "train.jsonl")) == 200


def test_errors_exit_2_with_one_line(tmp_path):
    cases = [
        (["tools/build_dataset.py", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")], "no such file"),
        (["tools/build_dataset.py", VAL, "-o", str(tmp_path / "o"), "--val-size", "200"], "leaves no training"),
        (["tools/build_dataset.py", VAL, "-o", str(tmp_path / "o"), "--val-size", "5", "--val-ratio", "0.1"],
         "not allowed with"),
        (["tools/build_dataset.py", VAL, "-o", str(tmp_path / "o"), "--drop-overlong"], "needs --tokenizer"),
    ]
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text('{"prompt": 1}\nnot json\n')
    cases.append((["tools/build_dataset.py", str(only_bad), "-o", str(tmp_path / "o2")], "no valid record"))
    for args, message in cases:
        proc = run_tool("python", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # nothing kept still leaves the rejected records behind
    assert len(_lines(tmp_path / "o2" / "rejected.jsonl")) == 2


def test_token_length_statistics_and_drop_overlong(tmp_path, tiny_dir):
    common = ["tools/build_dataset.py", UNI, VAL, "--tokenizer", tiny_dir, "--max-length", "300",
              "--max-response-length", "60"]
    proc = run_tool("python", *common, "-o", str(tmp_path / "flag"))
    assert proc.returncode == 0, proc.stderr
    report = json.load(open(tmp_path / "flag" / "report.json"))
    lengths = report["lengths"]
    assert lengths["settings"]["max_packed_length"] == 600
    assert lengths["truncated"]["reference"] >= 2 and lengths["truncated"]["prompt"] >= 1
    assert lengths["tokens"]["pair"]["max"] <= 600 and lengths["tokens"]["prompt"]["max"] > 300
    assert report["kept"] == 207  # flagged only

    proc = run_tool("python", *common, "-o", str(tmp_path / "drop"), "--drop-overlong")
    assert proc.returncode == 0, proc.stderr
    rejected = _lines(tmp_path / "drop" / "rejected.jsonl")
    assert rejected and all(r["reason"].startswith("overlong: ") and r["source"] == UNI for r in rejected)
    assert json.load(open(tmp_path / "drop" / "report.json"))["kept"] == 207 - len(rejected)


def test_ranked_converter_on_its_example(tmp_path):
    src = os.path.join(REPO, "data", "examples", "ranked.jsonl")
    proc = run_tool("python", "tools/build_dataset.py", src, "--from", "ranked", "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    recs = _lines(tmp_path / "train.jsonl")
    # 4 responses: best = reference, 3 ordered pairs among the rest; 3 responses: 1 pair
    assert len(recs) == 4
    first = recs[0]
    assert first["reference"][0]["content"].startswith("Canberra. It was chosen")
    assert (first["chosen"][0]["content"], first["rejected"][0]["content"]) == (
        "The capital is Canberra.", "It is Sydney, the largest city.")
    assert all(r["source"] == "example-ranked" for r in recs)
    assert recs[3]["chosen"][0]["content"] == "8" and recs[3]["rejected"][0]["content"] == "12"


def test_ranked_converter_refusals_name_the_line(tmp_path):
    bad = tmp_path / "ranked_bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "q", "responses": [{"response": "a", "score": 1}, {"response": "b", "score": 0}]}),
        json.dumps({"prompt": "q", "responses": [{"response": "a", "score": 2}, {"response": "b", "score": 2},
                                                 {"response": "c", "score": 1}]}),
        json.dumps({"prompt": "q", "responses": [{"response": "a"}, {"response": "b", "score": 2},
                                                 {"response": "c", "score": 1}]}),
        # NaN was read, sorted anywhere and could become the reference
        '{"prompt": "q", "responses": [{"response": "a", "score": NaN}, {"response": "b", "score": 2}, '
        '{"response": "c", "score": 1}]}',
    ]) + "\n")
    proc = run_tool("python", "tools/build_dataset.py", str(bad), "--from", "ranked", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2
    rejected = _lines(tmp_path / "o" / "rejected.jsonl")
    assert [(r["line"], r["field"]) for r in rejected] == [(1, "responses"), (2, "responses"), (3, "responses"),
                                                           (4, "responses")]
    assert "three or more" in rejected[0]["reason"] and "top score" in rejected[1]["reason"]
    assert "'responses[0].score' must be a finite number, got NaN" in rejected[3]["reason"]


def test_pairwise_without_reference_is_refused_with_what_is_needed(tmp_path):
    src = os.path.join(REPO, "data", "examples", "pairwise_no_reference.jsonl")
    proc = run_tool("python", "tools/build_dataset.py", src, "--from", "pairwise", "-o", str(tmp_path))
    assert proc.returncode == 2 and "no valid record" in proc.stderr
    (rej,) = _lines(tmp_path / "rejected.jsonl")
    assert rej["field"] == "reference" and "add a 'reference' field" in rej["reason"]


def _peak_rss_kb(args):
    """Peak RSS of one tool run, measured in a fresh child process."""
    import subprocess
    import sys

    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, *args], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_memory_does_not_grow_with_input(tmp_path):
    from polar_xtuner.demo.data import generate, write_jsonl

    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_jsonl(str(small), generate(3000, 1))
    write_jsonl(str(large), generate(30000, 1))
    rss_small = _peak_rss_kb(["tools/build_dataset.py", str(small), "-o", str(tmp_path / "s"), "--val-ratio", "0.1"])
    rss_large = _peak_rss_kb(["tools/build_dataset.py", str(large), "-o", str(tmp_path / "l"), "--val-ratio", "0.1"])
    assert len(_lines(tmp_path / "l" / "train.jsonl")) + len(_lines(tmp_path / "l" / "val.jsonl")) == 30000
    # ten times the records (about 11 MB more input) within a few MB of peak memory
    assert rss_large < rss_small * 1.2, (rss_small, rss_large)


def test_outputs_never_overwrite_inputs_and_a_failed_run_keeps_the_previous_outputs(tmp_path):
    import shutil

    out = tmp_path / "out"
    first = run_tool("python", "tools/build_dataset.py", f"{REPO}/data/demo/val.jsonl", "-o", str(out))
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.jsonl", "rejected.jsonl", "report.json"}
    # its own output as the input: refused, the file untouched
    again = run_tool("python", "tools/build_dataset.py", str(out / "train.jsonl"), "-o", str(out))
    assert again.returncode == 2 and "would overwrite" in again.stderr and "Traceback" not in again.stderr
    # an output directory inside an input directory: refused
    shutil.copy(f"{REPO}/data/demo/val.jsonl", tmp_path / "in.jsonl")
    inside = run_tool("python", "tools/build_dataset.py", str(tmp_path), "-o", str(tmp_path / "clean"))
    assert inside.returncode == 2 and "inside the input directory" in inside.stderr
    # a run that fails after reading (more val records than data) leaves the earlier outputs intact
    failed = run_tool("python", "tools/build_dataset.py", f"{REPO}/data/demo/val.jsonl", "-o", str(out),
                      "--val-size", "500")
    assert failed.returncode == 2 and "leaves no training record" in failed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left either


def test_margins_are_kept_and_bad_ones_rejected_by_line(tmp_path):
    src = tmp_path / "m.jsonl"
    base = {"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b"}
    src.write_text("\n".join(json.dumps(dict(base, chosen=f"a{i}", **extra)) for i, extra in enumerate(
        [{"margin": 2.5}, {}, {"margin": "big"}, {"margin": 2.5}])) + "\n")
    proc = run_tool("python", "tools/build_dataset.py", str(src), "--dedupe", "-o", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    kept = _lines(tmp_path / "o" / "train.jsonl")
    assert [r.get("margin") for r in kept] == [2.5, None, 2.5]
    rejected = _lines(tmp_path / "o" / "rejected.jsonl")
    assert [(r["line"], r["field"]) for r in rejected] == [(3, "margin")]


def test_example_triples_are_what_the_tool_builds(tmp_path):
    proc = run_tool("python", "tools/build_dataset.py", "data/examples/policies.jsonl", "--from", "policies",
                    "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert open(tmp_path / "train.jsonl").read() == open(
        os.path.join(REPO, "data", "examples", "policy_triples.jsonl")).read()
