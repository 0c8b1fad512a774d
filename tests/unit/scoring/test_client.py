"""The remote path: a loopback server that answers like sglang, vllm and lmdeploy."""
import base64
import json
import math
import random
import struct
import time
from collections import Counter

import pytest
import torch
from hypothesis import given, strategies as st
from samples import FAST, json_values

from common import REPO
from fakes import FakeServer
from polar_xtuner.demo.data import generate
from polar_xtuner.scoring.client import BadScoreError, RemoteScorer, RemoteScoringError, SERVER_TYPES, parse_scores
from polar_xtuner.scoring.local import score_records
from polar_xtuner.scoring.remote import score_records_remote


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
        # 20 texts of 20 keys over two replicas: both busy, neither over the bounded load (1.25 x 10 texts)
        placed = [sum(len(b["input"]) for _, b in s.requests) for s in servers]
        assert sum(placed) == 20 and all(4 <= n <= 12 for n in placed), placed
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


def _answer(server_type, scores, order):
    if server_type == "sglang":
        return [{"embedding": [scores[i]], "index": i} for i in order]
    if server_type == "vllm":
        return {"data": [{"index": i, "data": [[0.0], [scores[i]]]} for i in order]}
    return {"data": [{"index": i, "data": scores[i]} for i in order]}


@FAST
@given(server_type=st.sampled_from(SERVER_TYPES), body=json_values, n=st.integers(0, 4))
def test_any_server_answer_is_scores_or_a_remote_error(server_type, body, n):
    try:
        out = parse_scores(server_type, body, n)
    except RemoteScoringError as e:
        assert server_type in str(e) or "score" in str(e)
        return
    assert len(out) == n and all(isinstance(s, float) and math.isfinite(s) for s in out)


@FAST
@given(server_type=st.sampled_from(SERVER_TYPES),
       scores=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=8), data=st.data())
def test_answers_in_any_order_are_matched_by_index(server_type, scores, data):
    order = data.draw(st.permutations(range(len(scores))))
    assert parse_scores(server_type, _answer(server_type, scores, order), len(scores)) == \
        pytest.approx(scores, abs=0)


def _group_texts(n_groups, n_rollouts, seed=0):
    """Texts as a served POLAR model gets them (prompt, reference, <|reward|>, answer), shuffled."""
    texts = [f"prompt {g}\nreference {g}<|reward|>prompt {g}\nanswer {k}" for g in range(n_groups)
             for k in range(n_rollouts)]
    random.Random(seed).shuffle(texts)
    return texts


def _sent(server):
    return [t for path, body in server.requests if path == "/pooling" for t in body["input"]]


def test_a_prompts_rollouts_go_to_one_replica_whatever_their_order():
    servers = [FakeServer("lmdeploy") for _ in range(2)]
    try:
        scorer = RemoteScorer("lmdeploy", ",".join(s.address for s in servers), batch_size=8)
        texts = _group_texts(16, 8)
        assert scorer.score(texts) == [float(len(t)) for t in texts]
        home = {}
        for n, server in enumerate(servers):
            for t in _sent(server):
                home.setdefault(t.split("<|reward|>")[0], set()).add(n)
        assert len(home) == 16 and all(len(v) == 1 for v in home.values())
        assert {n for v in home.values() for n in v} == {0, 1}
        # explicit keys (the RL functions' and eval_pref's group_key of prompt and reference) win over the text
        for s in servers:
            s.requests.clear()
        scorer.score(["a", "b", "c", "d"] * 4, keys=["same"] * 16)
        assert sorted(len(_sent(s)) for s in servers) == [0, 16]
        with pytest.raises(ValueError, match="keys"):
            scorer.score(["a", "b"], keys=["k"])
    finally:
        for s in servers:
            s.close()


def test_one_router_address_stands_for_its_healthy_workers():
    workers = [FakeServer("lmdeploy") for _ in range(3)]
    listed = {"healthy": [True, True, False]}

    def listing():
        return [{"url": f"http://{w.address}", "is_healthy": h} for w, h in zip(workers, listed["healthy"])]

    router = FakeServer("fail", workers=listing)  # scores sent through it would fail
    try:
        scorer = RemoteScorer("lmdeploy", router.address, batch_size=4)
        texts = _group_texts(12, 4)
        assert scorer.score(texts) == [float(len(t)) for t in texts]
        assert router.requests == [] and router.lookups == 1
        assert len(_sent(workers[0])) > 0 and len(_sent(workers[1])) > 0 and _sent(workers[2]) == []
        # the router reports the third back and the first gone: the next read of its list follows
        listed["healthy"] = [False, True, True]
        scorer._refresh_members(force=True)
        for _ in range(100):
            if scorer.fleet.replicas == [f"http://{workers[1].address}", f"http://{workers[2].address}"]:
                break
            time.sleep(0.02)
        for w in workers:
            w.requests.clear()
        scorer.score(_group_texts(12, 4, seed=1))
        assert _sent(workers[0]) == [] and len(_sent(workers[2])) > 0
    finally:
        for s in workers + [router]:
            s.close()


def test_a_dead_replicas_groups_move_to_the_next_and_stay_together():
    live = FakeServer("lmdeploy")
    dead = FakeServer("fail")
    try:
        scorer = RemoteScorer("lmdeploy", f"{dead.address},{live.address}", batch_size=8, backoff=0.01)
        texts = _group_texts(16, 8)
        assert scorer.score(texts) == [float(len(t)) for t in texts]  # no score lost
        assert len(_sent(live)) == len(texts)
        assert scorer.fleet.live() == [f"http://{live.address}"]  # left out for a while
        # the moved groups went whole: each request holds whole groups (8 texts of one prompt each)
        for path, body in live.requests:
            prompts = Counter(t.split("<|reward|>")[0] for t in body["input"])
            assert all(n == 8 for n in prompts.values()), prompts
    finally:
        live.close()
        dead.close()


def test_a_router_that_did_not_answer_the_first_lookup_is_asked_again():
    worker = FakeServer("lmdeploy")
    calls = {"n": 0}

    def listing():
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("not up yet")  # the handler dies: the client's lookup gets no answer
        return [{"url": f"http://{worker.address}", "is_healthy": True}]

    router = FakeServer("lmdeploy", workers=listing)  # also scores, as the worker it proxies to would
    try:
        scorer = RemoteScorer("lmdeploy", router.address, backoff=0.01)
        assert scorer.score(["ab", "abc"]) == [2.0, 3.0]
        assert len(router.requests) == 1 and worker.requests == []  # a server, for this round
        scorer._refresh_members(force=True)  # the next look (every few seconds, or after a failure)
        assert scorer.score(["abcd"]) == [4.0]
        assert len(router.requests) == 1 and len(worker.requests) == 1  # now known as a router
    finally:
        worker.close()
        router.close()
