"""A real scoring fleet: `tools/serve.sh --replicas 2` (two vLLM CPU replicas behind vllm-router).

One fleet for the module, started as a user starts it, on a fresh tiny model
(its lengths recorded as tools/convert.sh records them). In order:

* it starts from one command, and eval_pref through the router's one address
  gives the local scores;
* RL groups keep their prefix-cache hits on the fleet (`make bench`'s fleet
  section on a few groups);
* a replica that stalls, then one that is killed mid-run, cost no score, and
  the killed one, restarted by the launcher, is used again;
* SIGTERM to the launcher stops every process of the fleet.

The fleet is the session's ``scoring_fleet`` (tests/conftest.py), shared
with integration/bench/test_remote.py, which runs first; its replicas run with
``--enforce-eager`` (the fixture says why).
"""
import json
import math
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from bench.fleet import measure_fleet, prefix_cache_counters, shuffled_groups
from common import REPO, free_port, load_tool, run_tool
from fakes import FakeServer, send
from polar_xtuner.rl.reward import PolarReward, RFTSettings
from polar_xtuner.scoring.client import http_request
from polar_xtuner.scoring.fleet import DEFAULT_DOWN_S
from polar_xtuner.serve.fleet import router_binary, router_command
from polar_xtuner.serve.launcher import CPU_SERVE_VENV, stop, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.serving, pytest.mark.slow]

# Remote vs local scores, relative (tests/integration/serve/test_serve.py says why 5e-3).
REMOTE_TOL = 5e-3
# Two replicas of one fp32 model on the same CPU kernels: float32 rounding.
REPLICA_TOL = 1e-4


def _workers(address):
    status, body = http_request("GET", f"http://{address}/workers", timeout=10)
    assert status == 200
    return {w["url"]: w["is_healthy"] for w in json.loads(body)["workers"]}


def _requests_done(replica):
    status, body = http_request("GET", replica + "/metrics", timeout=10)
    assert status == 200
    return sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} ([0-9.eE+-]+)$', body.decode(),
                                            re.M))


def _reward(tiny, address, **settings):
    from transformers import AutoTokenizer

    return PolarReward(RFTSettings(server_address=address, model=tiny, **settings),
                       tokenizer=AutoTokenizer.from_pretrained(tiny))


def _close(got, want, tol):
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, want))
    return len(got) == len(want) and worst <= tol, worst


VAL = os.path.join(REPO, "data", "demo", "val.jsonl")
RL_PY = os.path.join(REPO, ".venv-rl", "bin", "python")


def _saved_scores(path):
    return [s for line in open(path) for k, s in json.loads(line).items() if k in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def local_val(_fleet_session, tmp_path_factory):
    """eval_pref's local scores of the held-out demo pairs on the fleet's model: chosen, rejected, ...

    Module-scoped, so from the session's fixture itself: it reads the model dir, not the replicas.
    """
    tiny, _ = _fleet_session
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    # eval_pref's main() in this process: the local side is the reference here, not the subject
    assert load_tool("eval_pref").main(["--model", tiny, "--data", VAL, "--save-scores", str(out)]) == 0
    return _saved_scores(out)


def test_the_fleet_starts_from_one_command_and_scores_equal_local(scoring_fleet, local_val, tmp_path):
    tiny, running = scoring_fleet
    log = running.log()
    assert len(running.replicas) == 2 and len(set(running.pids)) == 2
    assert "--policy consistent_hash" in log and "--runner pooling" in log and "--pooler-config" in log
    shares = re.findall(r"\(VLLM_CPU_OMP_THREADS_BIND=([0-9,]+)\)", log)  # the launcher's own lines
    assert len(shares) == 2 and len(set(shares)) == 2  # a share of the cores each
    assert _workers(running.address) == {u: True for u in running.replicas}
    # the held-out pairs through the router's one address, against the model scored here
    out = tmp_path / "fleet.jsonl"
    res = run_tool("python", "tools/eval_pref.py", "--model", tiny, "--data", VAL, "--save-scores", str(out),
                   "--server-type", "vllm", "--server-address", running.address)
    assert res.returncode == 0, res.stderr[-3000:]
    ok, worst = _close(_saved_scores(out), local_val, REMOTE_TOL)
    assert ok, worst
    assert "served dtype float32 matches" in res.stderr  # asked of a replica the router lists
    assert all(_requests_done(r) > 0 for r in running.replicas)  # both replicas scored


def test_verl_and_openrlhf_score_through_the_fleet_unchanged(scoring_fleet, local_val, tmp_path):
    """verl 0.9.1's reward loop and OpenRLHF 0.11.2's agent executor, given the fleet's one address."""
    if not os.path.exists(os.path.join(REPO, ".venv-rl", ".installed")):
        pytest.fail("verl/OpenRLHF are missing at .venv-rl: run `make rl-setup` (make test does)")
    tiny, running = scoring_fleet
    before = [_requests_done(r) for r in running.replicas]
    out = tmp_path / "rl.json"
    res = run_tool(RL_PY, "tests/assets/rl_frameworks.py", tiny, running.address, VAL, str(out),
                   env={"PYTHONPATH": REPO}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.load(open(out))
    for name in ("verl", "openrlhf"):
        ok, worst = _close(got[name], local_val, REMOTE_TOL)
        assert ok, (name, worst)
    assert all(_requests_done(r) > b for r, b in zip(running.replicas, before))


def test_rl_groups_keep_their_prefix_cache_hits_across_two_replicas(scoring_fleet):
    tiny, running = scoring_fleet
    out = measure_fleet(running, tiny, n_groups=8, n_rollouts=8, repeats=1)
    assert {k for k in out if k.startswith("fleet_")} >= {
        "fleet_prefix_cache_hit_rate_prefix", "fleet_prefix_cache_hit_rate_round_robin",
        "fleet_prefix_cache_hit_rate_single", "fleet_rollouts_per_s_prefix", "fleet_rollouts_per_s_round_robin",
        "fleet_speedup_prefix_vs_round_robin"}
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out
    # Hit rates count tokens and do not depend on timing: each group's prefix is computed once
    # with prefix routing (as on one replica), and on both replicas with round robin.
    assert out["fleet_prefix_cache_hit_rate_prefix"] >= 0.8 * out["fleet_prefix_cache_hit_rate_single"], out
    assert out["fleet_prefix_cache_hit_rate_prefix"] > out["fleet_prefix_cache_hit_rate_round_robin"], out


def test_a_stalled_replica_costs_no_score(scoring_fleet):
    tiny, running = scoring_fleet
    work = shuffled_groups(16, 8, seed=31)
    want = _reward(tiny, running.replicas[0].split("://")[1]).score(*work)  # one replica alone
    reward = _reward(tiny, running.address, timeout=4, batch_size=8)
    os.killpg(running.pids[1], signal.SIGSTOP)  # alive, connected, silent
    try:
        t0 = time.monotonic()
        got = reward.score(*work)
        took = time.monotonic() - t0
    finally:
        os.killpg(running.pids[1], signal.SIGCONT)
    ok, worst = _close(got, want, REPLICA_TOL)
    assert ok, worst
    assert took < reward.scorer.batch_deadline_s, took  # moved on after one timeout, not after every attempt


def test_a_killed_replica_costs_no_score_and_its_restart_is_used_again(scoring_fleet):
    tiny, running = scoring_fleet
    work = shuffled_groups(64, 8, seed=41)
    want = _reward(tiny, running.replicas[1].split("://")[1]).score(*work)
    reward = _reward(tiny, running.address, timeout=20, batch_size=4)  # many small requests: the kill lands mid-run
    victim, before = running.replicas[0], _requests_done(running.replicas[0])
    result = {}
    worker = threading.Thread(target=lambda: result.update(scores=reward.score(*work)))
    worker.start()
    deadline = time.monotonic() + 60
    while _requests_done(victim) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.is_alive(), "the round ended before the kill; give it more work"
    os.killpg(running.pids[0], signal.SIGKILL)  # the engine and its workers, as a lost machine
    worker.join(timeout=300)
    round_end = time.monotonic()  # every failure the client saw, and so every leave-out, began before this
    ok, worst = _close(result.get("scores", []), want, REPLICA_TOL)
    assert ok, worst
    # the launcher starts it again on its port; the router's health checks take it back
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if "replica 1 (" in running.log() and _workers(running.address).get(victim):
            break
        time.sleep(1)
    assert "starting it again" in running.log() and _workers(running.address)[victim], running.log()[-3000:]
    new_pid = int(re.findall(r"replica 1: \S+ \(pid (\d+)\)", running.log())[-1])
    assert new_pid != running.pids[0]
    running.pids[0] = new_pid
    # the client's own leave-out of the replica it saw fail ends (most often while the restart ran)
    time.sleep(max(0.0, round_end + DEFAULT_DOWN_S + 0.5 - time.monotonic()))
    fresh = shuffled_groups(32, 8, seed=43)
    reward.score(*fresh)
    assert _requests_done(victim) > 0  # a new process: its counters started at 0
    hits, queries = prefix_cache_counters(victim)
    assert queries > 0


def test_sigterm_stops_every_process_of_the_fleet(scoring_fleet):
    _, running = scoring_fleet
    os.killpg(running.proc.pid, signal.SIGTERM)
    assert running.proc.wait(timeout=120) == 128 + signal.SIGTERM
    time.sleep(1)
    for pid in running.pids:  # each replica's process group: the API server and its engine-core workers
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    for url in running.replicas + [f"http://{running.address}"]:
        with pytest.raises(OSError):
            http_request("GET", url + "/health", timeout=5)


@pytest.mark.parametrize("policy", ["cache_aware", "consistent_hash"])
def test_vllm_router_does_not_route_pooling_by_its_content(policy, tmp_path):
    """The evidence behind placing texts in the client (docs/serving.md, "A fleet"), kept true.

    vllm-router sends /pooling through its transparent proxy: ``cache_aware`` finds no text to
    match there and sends every request to one worker, and ``consistent_hash`` keeps a group
    together only by a header the client sets. Two stand-in workers record what reaches them.
    """
    def answer(request):
        if request.command == "GET":  # the router's health checks
            return send(request, 200, {})
        send(request, 200, {"data": [{"index": 0, "data": [[0.0]]}]})

    workers = [FakeServer(answer=answer) for _ in range(2)]
    port = free_port()
    cmd = router_command(router_binary(os.path.join(CPU_SERVE_VENV, "bin", "python")), "127.0.0.1", port,
                         [f"http://{w.address}" for w in workers], "/health", policy, free_port())
    log = open(tmp_path / "router.log", "w")
    router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", router, timeout=60, what="vllm-router")
        for keyed in (False, True):
            for w in workers:
                w.requests.clear()
            for g in range(8):
                for k in range(4):  # a group's requests share their first 40 tokens
                    body = json.dumps({"input": [[g] * 40 + [100 + k]]}).encode()
                    headers = {"Content-Type": "application/json", **({"X-Session-ID": f"group-{g}"} if keyed else {})}
                    status, _ = http_request("POST", f"http://127.0.0.1:{port}/pooling", body, 10, headers)
                    assert status == 200
            homes = {}
            for n, w in enumerate(workers):
                for path, b in w.requests:
                    if path == "/pooling":
                        homes.setdefault(b["input"][0][0], set()).add(n)
            assert len(homes) == 8
            if policy == "cache_aware":  # one worker takes everything, keyed or not: no routing by content
                assert len({n for v in homes.values() for n in v}) == 1, homes
            elif keyed:  # the client's key keeps a group together
                assert all(len(v) == 1 for v in homes.values()), homes
            else:  # without one, groups are split
                assert any(len(v) > 1 for v in homes.values()), homes
    finally:
        stop(router, grace=10)
        log.close()
        for w in workers:
            w.close()
