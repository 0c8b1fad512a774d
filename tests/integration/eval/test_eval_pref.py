"""tools/eval_pref.py: groups and benchmarks in one report, --compare, --plot, one-line refusals, shared prefixes by default.

The tool runs in its own process where the process is what is checked (a whole
run's exit code and outputs, deadlines counted from the tool's start, a server
that fails); its refusals of bad input run its main() in this process, the same
code without ~3 s of start-up each.
"""
import json
import os
import time

import pytest

from common import ASSETS, REPO, VAL, free_port, load_tool, run_tool, run_tool_here, saved_scores
from fakes import FakeServer, trickle


pytestmark = pytest.mark.integration  # runs tools/eval_pref.py in a subprocess

BENCH = os.path.join(ASSETS, "benchmarks")


def test_groups_report_best_of_n_and_compare_with_a_model_and_with_saved_scores(tiny_dir, tmp_path, capsys):
    # main() in this process: the report is the subject (the script's process runs in the tests below)
    data = os.path.join(BENCH, "groups.jsonl")
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", data, "--out", tmp_path / "r.json",
                         "--save-scores", tmp_path / "s.jsonl", "--compare", tiny_dir,
                         "--plot", tmp_path / "both.png")
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
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", data, "--out", tmp_path / "r2.json",
                         "--no-shared-prefix", "--compare", tmp_path / "s.jsonl")
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
def test_bad_inputs_fail_with_one_line_and_exit_2(tiny_dir, args, message, capsys):
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, *[tiny_dir if a == "TINY" else a for a in args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert message in lines[-1] and "Traceback" not in proc.stderr


def test_one_response_groups_and_copied_references_are_refused(tiny_dir, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "p", "reference": "r", "responses": [{"response": "a", "label": 1}]}) + "\n")
    copied = tmp_path / "refs.jsonl"
    copied.write_text("".join(json.dumps({"id": i, "reference": r}) + "\n" for i, r in
                              [("42", "x"), ("7", "William Shakespeare wrote Hamlet."), ("tied:3", "y")]))
    for args, message in [(["--data", str(one)], "one.jsonl:1: 'responses' holds 1 response(s)"),
                          (["--data", f"{BENCH}/rewardbench2.jsonl", "--format", "rewardbench2", "--references",
                            str(copied)], "rewardbench2.jsonl:2: the reference is identical to response 1")]:
        proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, *args, "--out", str(tmp_path / "r.json"))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
        assert message in proc.stderr and not (tmp_path / "r.json").exists()


pytestmark = pytest.mark.integration  # runs tools/eval_pref.py in a subprocess

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def test_eval_pref_shares_prefixes_and_the_scores_equal_the_unshared(tiny_dir, tmp_path, capsys):
    runs = {}
    for name, extra in (("shared", []), ("whole", ["--no-shared-prefix"])):
        proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", VAL, *extra,
                             "--out", tmp_path / f"{name}.json", "--save-scores", tmp_path / f"{name}.jsonl")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.load(open(tmp_path / f"{name}.json"))
        scores = saved_scores(tmp_path / f"{name}.jsonl")
        runs[name] = report, scores
    assert runs["shared"][0]["shared_prefix"] is True and runs["whole"][0]["shared_prefix"] is False
    a, b = runs["shared"][1], runs["whole"][1]
    assert len(a) == len(b) == 200
    assert max(abs(x - y) / max(1.0, abs(y)) for p, q in zip(a, b) for x, y in zip(p, q)) <= 1e-5


def test_eval_cli_against_servers(tiny_dir, tmp_path, capsys):
    """eval_pref's process against a served model and a dead server; the local baseline through its main() here."""
    from polar_xtuner.scoring.local import load_model

    model, tok = load_model(tiny_dir, device="cpu")
    server = FakeServer("vllm", model, tok)
    try:
        out = tmp_path / "remote.json"
        proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", VAL,
                        "--server-type", "vllm", "--server-address", server.address, "--out", str(out),
                        "--plot", str(tmp_path / "scores.png"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        local = tmp_path / "local.json"
        code = load_tool("eval_pref").main(["--model", tiny_dir, "--data", VAL, "--out", str(local)])
        assert code == 0, capsys.readouterr().err[-2000:]
    finally:
        server.close()
    remote_r, local_r = json.load(open(out)), json.load(open(local))
    assert remote_r["n"] == local_r["n"] == 200 and remote_r["backend"] == "vllm"
    assert remote_r["accuracy"] == local_r["accuracy"]
    assert (tmp_path / "scores.png").stat().st_size > 1000

    dead = FakeServer("fail")
    try:  # main() here: the process's exit codes are the remote run's above and integration/scoring's
        proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", VAL, "--server-type", "sglang",
                             "--server-address", dead.address, "--max-retries", "2")
    finally:
        dead.close()
    assert proc.returncode == 3 and "failed after 2 attempt" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_cli_skips_bad_records_and_rejects_bad_paths(tiny_dir, tmp_path, capsys):
    bad = f"{REPO}/tests/assets/bad_records.jsonl"
    scores = tmp_path / "s.jsonl"
    proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", bad,
                    "--save-scores", str(scores))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipped {bad}:2: invalid JSON" in proc.stderr
    rows = [json.loads(line) for line in open(scores)]
    assert [r["line"] for r in rows if r["chosen"] is not None] == [1, 12, 15]
    assert len(rows) == 14  # every non-blank input line, in order
    proc = run_tool_here(capsys, "eval_pref", "--model", str(tmp_path), "--data", bad)
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", str(tmp_path / "no.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", bad, "--server-type", "vllm",
                         "--batch-tokens", "0")
    assert proc.returncode == 2 and "argument --batch-tokens: must be an integer of at least 1" in proc.stderr \
        and "Traceback" not in proc.stderr


def test_eval_cli_outputs_are_checked_first_and_written_whole(tiny_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "val.jsonl"
    shutil.copy(VAL, data)
    original = data.read_bytes()
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", str(data), "--out", str(data))
    assert proc.returncode == 2 and "would overwrite an input" in proc.stderr and data.read_bytes() == original
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores directory permissions
            proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", data, "--out", ro / "r.json")
            assert proc.returncode == 2 and "not writable" in proc.stderr and "Scoring" not in proc.stderr
    finally:
        ro.chmod(0o700)
    # a server answering NaN: exit 3 naming the text, and no report that looks complete (the tool's
    # process on a NaN: test_faults.py); main() here, as the refusals above
    server = FakeServer("vllm", scores=[float("nan")])
    out = tmp_path / "r.json"
    try:
        proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", data, "--server-type", "vllm",
                             "--server-address", server.address, "--out", out)
    finally:
        server.close()
    assert proc.returncode == 3 and "non-finite" in proc.stderr and not out.exists()
    # a good run writes strict JSON and leaves no temporary file behind
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", str(data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the report"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "ro", "val.jsonl"]


def test_the_issue_example_eval_pref_timeout_2_against_a_trickling_http_server(tiny_dir, tmp_path):
    """issue 27: ``--server-type vllm --timeout 2 --max-retries 1`` took 33 s; now 2 s past the tool's start."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b"}) + "\n")
    args = ["python", "tools/eval_pref.py", "--model", tiny_dir, "--data", str(data), "--server-type", "vllm",
            "--timeout", "2", "--max-retries", "1", "--server-address"]
    t0 = time.monotonic()  # the tool's own start: the same run against a closed port
    refused = run_tool(*args, f"127.0.0.1:{free_port()}", timeout=120)
    start = time.monotonic() - t0
    assert refused.returncode == 3, refused.stderr[-2000:]
    with FakeServer(answer=trickle(every=0.5)) as server:  # http.server's way (HTTP/1.0): a byte every half second
        t0 = time.monotonic()
        proc = run_tool(*args, server.address, timeout=120)
        took = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 3 and len(errors) == 1 and "within 2 s" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert took <= start + 2 + 3, (took, start)  # 3 s for the noise between two starts of the tool
