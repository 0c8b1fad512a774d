"""The remote path: a loopback server that answers like sglang, vllm and lmdeploy."""
import base64
import json
import os
import struct

import pytest
import torch

from common import REPO, load_tool, run_tool
from fakes import FakeServer
from polar_xtuner.scoring.client import BadScoreError, RemoteScorer, RemoteScoringError, parse_scores
from polar_xtuner.scoring.remote import score_records_remote
from polar_xtuner.demo.data import generate
from polar_xtuner.scoring.local import score_records

VAL = f"{REPO}/data/demo/val.jsonl"


@pytest.mark.parametrize("mode", ["sglang", "vllm", "lmdeploy"])
def test_remote_scores_equal_local_scores(mode, tiny_model, tokenizer):
    recs = list(generate(10, 9))
    server = FakeServer(mode, tiny_model, tokenizer)
    try:
        scorer = RemoteScorer(mode, server.address, batch_size=6, concurrency=1)
        remote = score_records_remote(scorer, tokenizer, recs, 512, 128)
    finally:
        server.close()
    local = score_records(tiny_model, tokenizer, recs, 512, 128)
    assert torch.allclose(torch.tensor(remote), torch.tensor(local), atol=1e-5)
    for path, body in server.requests:
        assert path == ("/classify" if mode == "sglang" else "/pooling")
        texts = body["text"] if mode == "sglang" else body["input"]
        if mode == "vllm":  # token ids, ending with the reward token's
            assert all(isinstance(t, list) and t[-1] == tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_130]")
                       for t in texts)
        else:
            assert all(t.endswith("[UNUSED_TOKEN_130]") for t in texts)
    scored = [r for r in server.requests if r[1].get("use_activation") is not True]
    assert sorted(len(b.get("text", b.get("input"))) for _, b in scored) == [2, 6, 6, 6]  # 20 in batches of 6
    if mode == "vllm":  # raw scores asked for; the sigmoid probe only when no score is outside [0, 1]
        assert all(b["use_activation"] is False for _, b in scored)
        first_answer = [s for pair in remote[:3] for s in pair]  # the first request's 6 texts
        assert len(server.requests) == 4 + all(0 <= s <= 1 for s in first_answer)


def test_retries_then_succeeds():
    server = FakeServer("lmdeploy", fail_first=2)
    try:
        scorer = RemoteScorer("lmdeploy", server.address, max_retries=3, backoff=0.01, concurrency=1)  # one request
        scores = scorer.score(["ab", "abc"])
    finally:
        server.close()
    assert scores == [2.0, 3.0] and len(server.requests) == 3


def test_failure_is_an_error_not_none():
    server = FakeServer("fail")
    try:
        with pytest.raises(RemoteScoringError, match="failed after 2 attempt.*HTTP 500"):
            RemoteScorer("sglang", server.address, max_retries=2, backoff=0.01).score(["x"])
    finally:
        server.close()
    assert len(server.requests) == 2  # bounded


def test_wrong_shape_and_unreachable_are_errors():
    server = FakeServer("bogus")
    try:
        with pytest.raises(RemoteScoringError, match="unexpected shape"):
            RemoteScorer("vllm", server.address).score(["x"])
    finally:
        server.close()
    with pytest.raises(RemoteScoringError, match="Connection(Refused)?Error"):
        RemoteScorer("vllm", "127.0.0.1:9", max_retries=1, timeout=2).score(["x"])
    with pytest.raises(RemoteScoringError, match="returned 1 scores for 2 texts"):
        parse_scores("lmdeploy", {"data": [{"data": 1.0}]}, 2)


@pytest.mark.integration  # runs a repository tool in a subprocess
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
    try:
        proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", VAL, "--server-type",
                        "sglang", "--server-address", dead.address, "--max-retries", "2")
    finally:
        dead.close()
    assert proc.returncode == 3 and "failed after 2 attempt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration  # runs a repository tool in a subprocess
def test_eval_cli_skips_bad_records_and_rejects_bad_paths(tiny_dir, tmp_path):
    bad = f"{REPO}/tests/assets/bad_records.jsonl"
    scores = tmp_path / "s.jsonl"
    proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", bad,
                    "--save-scores", str(scores))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipped {bad}:2: invalid JSON" in proc.stderr
    rows = [json.loads(line) for line in open(scores)]
    assert [r["line"] for r in rows if r["chosen"] is not None] == [1, 12, 15]
    assert len(rows) == 14  # every non-blank input line, in order
    proc = run_tool("python", "tools/eval_pref.py", "--model", str(tmp_path), "--data", bad)
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
    proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", str(tmp_path / "no.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", bad, "--server-type", "vllm",
                    "--batch-tokens", "0")
    assert proc.returncode == 2 and "argument --batch-tokens: must be an integer of at least 1" in proc.stderr \
        and "Traceback" not in proc.stderr


def test_vllm_sigmoid_trap_is_caught_or_avoided(tiny_model, tokenizer):
    recs = list(generate(6, 3))
    local = score_records(tiny_model, tokenizer, recs, 512, 128)
    # A server whose default is the sigmoid, as vLLM's: raw scores because we ask for them.
    server = FakeServer("vllm", tiny_model, tokenizer, activation="honour")
    try:
        remote = score_records_remote(RemoteScorer("vllm", server.address), tokenizer, recs, 512, 128)
    finally:
        server.close()
    assert torch.allclose(torch.tensor(remote), torch.tensor(local), atol=1e-5)
    # A server that ignores the field and squeezes every score into (0, 1): refused, not trusted.
    server = FakeServer("vllm", tiny_model, tokenizer, activation="always")
    try:
        with pytest.raises(RemoteScoringError, match="does not give raw scores.*use_activation"):
            score_records_remote(RemoteScorer("vllm", server.address), tokenizer, recs, 512, 128)
    finally:
        server.close()
    # An older server that ignores the field but never had the activation: its raw scores are kept.
    server = FakeServer("vllm", scores=[-3.5, 2.25], activation="never")
    try:
        assert RemoteScorer("vllm", server.address, concurrency=1).score(["a", "b", "c"]) == [-3.5, 2.25, -3.5]
    finally:
        server.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "1.5", None])
def test_non_finite_or_non_numeric_scores_are_errors(bad):
    body = {"data": [{"data": [[0.0], [1.0]]}, {"data": [[0.0], [bad]]}]}
    with pytest.raises(RemoteScoringError, match="text 1"):
        parse_scores("vllm", json.loads(json.dumps(body)), 2)
    with pytest.raises(RemoteScoringError, match="text 0"):
        parse_scores("lmdeploy", {"data": [{"data": bad}]}, 1)


def test_vllm_base64_scores_are_read_and_checked():
    ok = base64.b64encode(struct.pack("<3f", 0.5, -1.0, -2.25)).decode()  # three tokens' scores
    assert parse_scores("vllm", {"data": [{"data": ok}]}, 1) == [-2.25]
    nan = base64.b64encode(struct.pack("<2f", 0.0, float("nan"))).decode()
    with pytest.raises(RemoteScoringError, match="non-finite"):
        parse_scores("vllm", {"data": [{"data": nan}]}, 1)
    with pytest.raises(RemoteScoringError, match="unexpected shape"):
        parse_scores("vllm", {"data": [{"data": base64.b64encode(b"abc").decode()}]}, 1)


def test_requests_are_cut_by_texts_tokens_and_slots():
    scorer = RemoteScorer("vllm", "127.0.0.1:1", batch_size=4, batch_tokens=10, concurrency=1)
    ids = [[0] * n for n in (3, 3, 3, 2, 9, 20, 1, 1, 1, 1, 1)]
    # 3+3+3 fits and a 4th would pass 10 tokens; 9 alone; 20 goes alone though over; then 4 texts at most
    assert scorer.batches(ids) == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 10), (10, 11)]
    assert scorer.batches([]) == []
    # text inputs count characters, an upper bound on their tokens
    assert RemoteScorer("sglang", "127.0.0.1:1", batch_tokens=5, concurrency=1).batches(["abc", "de", "f"]) == [
        (0, 2), (2, 3)]
    # a small round is shared out over every server's slots (2 servers x 2) rather than sent as one request,
    # in requests of at least 4 texts (the sigmoid check's probe)
    two = RemoteScorer("vllm", "127.0.0.1:1,127.0.0.1:2", concurrency=2)
    assert two.batches([[0]] * 20) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert two.batches([[0]] * 10) == [(0, 4), (4, 8), (8, 10)]
    # the defaults: many short texts share a request, long ones go a few at a time
    default = RemoteScorer("vllm", "127.0.0.1:1")
    assert [e - s for s, e in default.batches([[0] * 40] * 2000)] == [256] * 7 + [208]
    assert {e - s for s, e in default.batches([[0] * 780] * 400)} == {21, 1}  # 21 x 780 <= 16384 < 22 x 780
    with pytest.raises(ValueError, match="batch_tokens"):
        RemoteScorer("vllm", "127.0.0.1:1", batch_tokens=0)


def test_a_bad_score_is_named_by_its_place_in_the_whole_round():
    class OneBadText(FakeServer):
        def score(self, texts):
            return [float("nan") if t == "bad" else 1.0 for t in texts]

    server = OneBadText("lmdeploy")
    try:
        for concurrency in (1, 4):  # the bad text in the second of two requests, one after the other or together
            scorer = RemoteScorer("lmdeploy", server.address, batch_size=2, concurrency=concurrency)
            with pytest.raises(BadScoreError, match="text 3"):
                scorer.score(["a", "b", "c", "bad"])
    finally:
        server.close()
    assert [len(b["input"]) for _, b in server.requests] == [2] * 4


def test_batches_are_spread_over_servers_and_in_flight_together():
    servers = [FakeServer("lmdeploy") for _ in range(2)]
    try:
        scorer = RemoteScorer("lmdeploy", ",".join(s.address for s in servers), batch_size=2, concurrency=2)
        texts = ["x" * n for n in range(1, 21)]
        assert scorer.score(texts) == [float(n) for n in range(1, 21)]  # in order
        assert [len(s.requests) for s in servers] == [5, 5]
        # a dead first server: its batches move on to the live one
        dead = FakeServer("fail")
        scorer = RemoteScorer("lmdeploy", f"{dead.address},{servers[1].address}", batch_size=2, backoff=0.01)
        assert scorer.score(texts[:8]) == [float(n) for n in range(1, 9)]
        dead.close()
    finally:
        for s in servers:
            s.close()
    with pytest.raises(ValueError, match="no port"):
        RemoteScorer("vllm", "localhost")


@pytest.mark.integration  # runs a repository tool in a subprocess
def test_eval_cli_outputs_are_checked_first_and_written_whole(tiny_dir, tmp_path):
    import shutil

    data = tmp_path / "val.jsonl"
    shutil.copy(VAL, data)
    original = data.read_bytes()
    proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", str(data), "--out", str(data))
    assert proc.returncode == 2 and "would overwrite an input" in proc.stderr and data.read_bytes() == original
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores directory permissions
            proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", str(data),
                            "--out", str(ro / "r.json"))
            assert proc.returncode == 2 and "not writable" in proc.stderr and "Scoring" not in proc.stderr
    finally:
        ro.chmod(0o700)
    # a server answering NaN: exit 3 naming the text, and no report that looks complete
    server = FakeServer("vllm", scores=[float("nan")])
    out = tmp_path / "r.json"
    try:
        proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", str(data),
                        "--server-type", "vllm", "--server-address", server.address, "--out", str(out))
    finally:
        server.close()
    assert proc.returncode == 3 and "non-finite" in proc.stderr and not out.exists()
    # a good run writes strict JSON and leaves no temporary file behind
    proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", str(data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the report"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "ro", "val.jsonl"]
