"""A real engine: vLLM's CPU build serves the converted demo model.

The demo model comes from `make demo`'s pipeline (the session's ``demo_run``
fixture); the engine from ``.venv-serve`` (`make serve-setup`). Checked on the
held-out demo pairs:

* ``tools/serve.sh`` + ``eval_pref --server-type vllm`` give the local scores;
* POLAR's own client (xtuner's ``RewardModelClient``) gets the same raw scores;
* a server started with vLLM's bare defaults (sigmoid on) still gives raw
  scores through our client, while POLAR's client gets the sigmoids;
* the plugin (polar_xtuner/serve/vllm_plugin.py) answers the last token's score
  and reads the prefix cache, and stands aside on a vLLM it does not fit.

`make bench`'s remote section, which starts its own two servers on a fresh tiny
model, is tests/integration/bench/test_remote.py.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from common import ONE_PROCESS_ENGINE, REPO, free_port, load_tool, run_tool, saved_scores
from polar_xtuner.serve.launcher import CPU_SERVE_VENV, ServeError, cuda_available, stop, wait_ready

pytestmark = pytest.mark.integration


def real_engine(test):
    """A test against a real vLLM server on the demo's model: integration, serving and slow
    (the session's demo run and the engine's start take ~2.5 min before the first, measured)."""
    for mark in (pytest.mark.integration, pytest.mark.serving, pytest.mark.slow):
        test = mark(test)
    return test


VAL = os.path.join(REPO, "data", "demo", "val.jsonl")
SERVE_PY = os.path.join(CPU_SERVE_VENV, "bin", "python")


def _need_serve_venv():
    if not os.path.exists(os.path.join(CPU_SERVE_VENV, ".plugin")):
        pytest.fail(f"vLLM's CPU build is missing at {CPU_SERVE_VENV}: run `make serve-setup` (make test does)")


@pytest.fixture(scope="module")
def served_model(demo_run):
    _need_serve_venv()
    return os.path.join(demo_run, "hf")


def _start(cmd, log_path, env=None):
    log = open(log_path, "w")
    full_env = dict(os.environ, **(env or {}))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                            start_new_session=True), log


# Remote vs local: 5e-3 relative. The sigmoid trap moves scores by 0.1 and more,
# fp16 serving by ~0.07; CPU kernels alone were seen to move this trained tiny
# model's local fp32 scores by 2.3e-3 from one process to the next.
REMOTE_TOL = 5e-3


def _close(a, b, rel=REMOTE_TOL):
    return all(abs(x - y) <= rel * max(1.0, abs(y)) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _polar_client_scores(model_dir, address):
    """Scores from xtuner's RewardModelClient (POLAR's published client)."""
    from xtuner.utils import RewardModelClient

    from polar_xtuner.encoding import EncodingSettings
    from polar_xtuner.records import load_records

    s = EncodingSettings.from_model_dir(model_dir)
    client = RewardModelClient(model_dir, max_length=s.max_length, max_response_length=s.max_response_length,
                               response_cut_side="right", server_type="vllm", server_address=address)
    data = []
    for r in load_records(VAL):
        for key in ("chosen", "rejected"):
            data.append({"prompt": r["prompt"], "reference": r["reference"], "output": r[key]})
    flat = client(data)
    assert flat is not None, "RewardModelClient returned None"
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


@pytest.fixture(scope="module")
def local_scores(served_model, tmp_path_factory):
    """The local reference: eval_pref on the served model dir, (scores, report).

    Computed here rather than taken from the demo's own run: this trained tiny
    model's fp32 CPU scores moved by up to 3e-3 between two local processes
    (8 of 400 scores beyond 1e-4; the model path's spelling was the only
    difference).
    """
    d = tmp_path_factory.mktemp("local")
    # eval_pref's main() in this process: the local side is the reference here (its process: the demo's run)
    code = load_tool("eval_pref").main(["--model", served_model, "--data", VAL, "--out", str(d / "local.json"),
                                        "--save-scores", str(d / "local.jsonl")])
    assert code == 0
    return saved_scores(d / "local.jsonl"), json.load(open(d / "local.json"))


@pytest.fixture(scope="module")
def serve_sh(served_model, tmp_path_factory):
    """tools/serve.sh serving the demo model, as a user starts it; stopped even when a test fails."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, log = _start(["bash", "tools/serve.sh", served_model, "--port", str(port)], log_path,
                       env={"PYTHON": sys.executable})
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=600)
        yield f"127.0.0.1:{port}", log_path
    finally:
        stop(proc)
        log.close()


@real_engine
def test_serve_sh_scores_equal_local(serve_sh, served_model, local_scores, tmp_path):
    address, log_path = serve_sh
    out, scores = tmp_path / "remote.json", tmp_path / "remote_scores.jsonl"
    res = run_tool("python", "tools/eval_pref.py", "--model", served_model, "--data", VAL,
                   "--server-type", "vllm", "--server-address", address,
                   "--out", str(out), "--save-scores", str(scores))
    assert res.returncode == 0, res.stderr[-3000:]
    served_log = open(log_path).read()
    assert "POLAR reward server ready" in served_log and "--pooler-config" in served_log
    assert "served dtype float32 matches" in res.stderr  # serve.sh passed --dtype, and the client checked it
    local, local_report = local_scores
    remote = saved_scores(scores)
    assert len(remote) == len(local) == 200
    assert _close(remote, local), max(abs(a - b) for pa, pb in zip(remote, local) for a, b in zip(pa, pb))
    assert json.load(open(out))["accuracy"] == local_report["accuracy"]


@real_engine
@pytest.mark.parametrize("data, extra", [
    ("groups.jsonl", []),
    ("rewardbench2.jsonl", ["--format", "rewardbench2", "--references",
                            os.path.join(REPO, "tests", "assets", "benchmarks", "rewardbench2_references.jsonl")]),
])
def test_group_metrics_served_equal_local(serve_sh, served_model, tmp_path, data, extra, capsys):
    """Best-of-N, MRR and pairwise accuracy of groups: the served model's equal the local model's.

    Through eval_pref's main() in this process (its own process runs in the tests above).
    """
    path = os.path.join(REPO, "tests", "assets", "benchmarks", data)
    main = load_tool("eval_pref").main
    runs = {}
    for name, flags in (("local", []), ("remote", ["--server-type", "vllm", "--server-address", serve_sh[0]])):
        code = main(["--model", served_model, "--data", path, *extra, *flags,
                     "--out", str(tmp_path / f"{name}.json"), "--save-scores", str(tmp_path / f"{name}.jsonl")])
        assert code == 0, capsys.readouterr().err[-3000:]
        runs[name] = (json.load(open(tmp_path / f"{name}.json")),
                      [r["scores"] for r in map(json.loads, open(tmp_path / f"{name}.jsonl"))])
    (local, local_scores), (remote, remote_scores) = runs["local"], runs["remote"]
    assert remote["backend"] == "vllm" and _close(remote_scores, local_scores)
    for key in ("records", "n", "accuracy", "best_of_n", "mrr", "ties", "top_ties"):
        assert remote[key] == local[key], key


@real_engine
def test_polar_client_gets_the_same_raw_scores(serve_sh, served_model, local_scores):
    polar = _polar_client_scores(served_model, serve_sh[0])
    assert _close(polar, local_scores[0])


def _prefix_cache_hits(address) -> float:
    """vLLM's count of prompt tokens read from the prefix cache (its /metrics)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=30).read().decode()
    return sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M))


@real_engine
def test_plugin_answers_the_last_token_and_reuses_shared_prefixes(serve_sh, served_model, local_scores):
    """One row per text (not one per token), and a pair's rejected text reads its chosen's prefix from cache."""
    from transformers import AutoTokenizer

    from polar_xtuner.scoring.client import RemoteScorer, post_json
    from polar_xtuner.encoding import EncodingSettings, PolarEncoder, pair_items
    from polar_xtuner.records import load_records
    from polar_xtuner.serve.launcher import CPU_BLOCK_SIZE

    address, log_path = serve_sh
    assert "polar_xtuner vLLM plugin" not in open(log_path).read()  # no fallback warning
    s = EncodingSettings.from_model_dir(served_model)
    enc = PolarEncoder(AutoTokenizer.from_pretrained(served_model), s.max_length, s.max_response_length)
    recs = load_records(VAL)
    scorer = RemoteScorer("vllm", address)
    all_ids = enc.serving_inputs(pair_items(recs), scorer.server_type, ["sft"] * len(recs))
    # pairs whose texts share a whole cache block, so each rejected text has one to read
    keep = [i for i in range(len(recs))
            if len(os.path.commonprefix([all_ids[2 * i], all_ids[2 * i + 1]])) > CPU_BLOCK_SIZE][:40]
    assert len(keep) >= 20, len(keep)
    ids = [all_ids[2 * i + k] for i in keep for k in (0, 1)]

    status, body = post_json(f"http://{address}/pooling", {"input": [ids[0]], "use_activation": False}, 60)
    rows = json.loads(body)["data"][0]["data"]
    assert status == 200 and len(ids[0]) > 1 and len(rows) == 1 and len(rows[0]) == 1, rows
    assert abs(rows[0][0] - local_scores[0][0][0]) <= REMOTE_TOL * max(1.0, abs(local_scores[0][0][0]))

    status, body = post_json(f"http://{address}/reset_prefix_cache", {}, 60)  # earlier tests scored these texts
    assert status == 200, body
    before = _prefix_cache_hits(address)
    chosen = scorer.score(ids[0::2])  # first the chosen texts, then the rejected ones: their prefix is cached
    after_chosen = _prefix_cache_hits(address)
    rejected = scorer.score(ids[1::2])
    after = _prefix_cache_hits(address)
    assert after - after_chosen >= CPU_BLOCK_SIZE * len(keep), (before, after_chosen, after)
    assert _close(list(zip(chosen, rejected)), [local_scores[0][i] for i in keep])


@pytest.mark.serving  # vLLM from .venv-serve, in a subprocess; no server
def test_plugin_stands_aside_on_a_vllm_it_does_not_fit():
    """Registered where vLLM has what it builds on; otherwise vLLM keeps its own class, with one warning."""
    _need_serve_venv()
    code = "\n".join([
        "import polar_xtuner.serve.vllm_plugin as p",
        "from vllm import ModelRegistry",
        "arch = 'InternLM2ForRewardModel'",
        "own = ModelRegistry.models[arch].module_name",
        "p.register()",
        "print('FIT', ModelRegistry.models[arch].module_name)",
        "ModelRegistry.register_model(arch, own + ':' + arch)",
        "p._NEEDED = p._NEEDED + (('vllm.no_such_module', 'X'),)",
        "p.register()",
        "print('MISFIT', ModelRegistry.models[arch].module_name)",
    ])
    res = subprocess.run([SERVE_PY, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FIT polar_xtuner.serve.vllm_plugin" in res.stdout
    assert "MISFIT vllm.model_executor.models.internlm2" in res.stdout
    warnings = [l for l in res.stderr.splitlines() if "this vLLM lacks" in l]
    assert len(warnings) == 1 and "vllm.no_such_module:X" in warnings[0], res.stderr[-2000:]


@real_engine
def test_rl_reward_functions_on_the_real_server(serve_sh, served_model, local_scores, monkeypatch):
    """verl's reward loop, verl's batch manager and OpenRLHF's reward_func, called as they call them."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from polar_xtuner import rft
    from polar_xtuner.records import load_records
    from fakes import verl_reward_loop, verl_rows

    for key in [k for k in os.environ if k.startswith("POLAR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("POLAR_SERVER_ADDRESS", serve_sh[0])
    monkeypatch.setenv("POLAR_MODEL", served_model)
    rft.forget_rewards()
    recs = load_records(VAL)
    local = [s for pair in local_scores[0] for s in pair]
    responses = [r[k][0]["content"] for r in recs for k in ("chosen", "rejected")]
    doubled = [r for r in recs for _ in range(2)]
    try:
        loop = asyncio.run(verl_reward_loop(doubled, responses))
        rows = verl_rows(doubled)
        batch = rft.compute_score_batch(["polar"] * len(rows), responses, [r["ground_truth"] for r in rows],
                                        [r["extra_info"] for r in rows])

        def openrlhf(i):
            prompt = f"<|im_start|>user\n{doubled[i]['prompt'][-1]['content']}<|im_end|>\n<|im_start|>assistant\n"
            label = json.dumps({"prompt": doubled[i]["prompt"], "reference": doubled[i]["reference"]})
            return rft.reward_func([prompt + responses[i] + "<|im_end|>"], [prompt], [label])["rewards"].item()

        with ThreadPoolExecutor(16) as pool:
            orl = list(pool.map(openrlhf, range(len(responses))))
    finally:
        rft.forget_rewards()
    for got in (loop, batch, orl):
        assert len(got) == 400
        assert all(abs(a - b) <= REMOTE_TOL * max(1.0, abs(b)) for a, b in zip(got, local))


@real_engine
def test_bare_vllm_defaults_still_give_raw_scores(served_model, local_scores, tmp_path, capsys):
    port = free_port()
    cmd = [SERVE_PY, "-m", "vllm.entrypoints.openai.api_server", "--model", served_model, "--runner", "pooling",
           "--trust-remote-code", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           # Eager only to skip a 17 s graph compile: no activation or pooler setting depends on it,
           # and the serve.sh server above runs vLLM's compiled default.
           "--enforce-eager"]
    # the worker inside the engine core (ONE_PROCESS_ENGINE): the pooler's defaults do not depend on it
    proc, log = _start(cmd, tmp_path / "vllm.log", env={"VLLM_CPU_KVCACHE_SPACE": "1", **ONE_PROCESS_ENGINE})
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=600)
        scores = tmp_path / "remote_scores.jsonl"
        # eval_pref's main() in this process: its client is the subject (its process: the test above)
        code = load_tool("eval_pref").main(["--model", served_model, "--data", VAL, "--server-type", "vllm",
                                            "--server-address", f"127.0.0.1:{port}", "--save-scores", str(scores)])
        assert code == 0, capsys.readouterr().err[-3000:]
        polar = _polar_client_scores(served_model, f"127.0.0.1:{port}")
    finally:
        stop(proc)
        log.close()
    local = local_scores[0]
    assert _close(saved_scores(scores), local)
    # The trap this guards against: POLAR's client gets sigmoid(score) from the same server.
    sig = [(1 / (1 + math.exp(-c)), 1 / (1 + math.exp(-r))) for c, r in local]
    assert _close(polar, sig) and not _close(polar, local)


def test_serve_sh_refuses_bad_input(tmp_path):
    res = run_tool("bash", "tools/serve.sh", str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.startswith("error:") and "no such model directory" in res.stderr
    res = run_tool("bash", "tools/serve.sh", str(tmp_path), "--engine", "sglang")
    assert res.returncode == 2 and "not a converted model directory" in res.stderr
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    if not cuda_available():
        res = run_tool("bash", "tools/serve.sh", str(tmp_path), "--engine", "sglang")
        assert res.returncode == 2 and "sglang has no CPU path" in res.stderr
    res = run_tool("bash", "tools/serve.sh", str(tmp_path), "--port", "70000")
    assert res.returncode == 2 and "--port" in res.stderr


def test_wait_ready_reports_an_engine_that_died():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"], start_new_session=True)
    with pytest.raises(ServeError, match="exited with code 7"):
        wait_ready(f"http://127.0.0.1:{free_port()}/health", proc, timeout=30, interval=0.1)
    stop(proc)
    with pytest.raises(ServeError, match="did not answer within"):
        wait_ready(f"http://127.0.0.1:{free_port()}/health", None, timeout=0.5, interval=0.1)


def test_stop_ends_the_whole_process_group(tmp_path):
    # an engine that starts a worker, as vLLM starts its EngineCore
    import time

    pid_file = tmp_path / "worker.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                             f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(600)"],
                            start_new_session=True)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    stop(proc, grace=5)
    assert proc.poll() is not None

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, not yet reaped
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(worker)  # the worker went with the engine


def test_engine_commands(tmp_path):
    from polar_xtuner.encoding import EncodingSettings
    from polar_xtuner.serve.launcher import engine_command

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    EncodingSettings(1024, 128, 4).save(str(tmp_path))
    cmd = engine_command("vllm", str(tmp_path), "127.0.0.1", 8000, "py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for flag in ("--runner pooling", "--trust-remote-code", "--dtype float32", "--max-model-len 1024",
                 '--pooler-config {"use_activation": false}'):
        assert flag in joined
    assert "--block-size" not in cmd  # GPU: vLLM's own block size
    cmd = engine_command("vllm", str(tmp_path), "127.0.0.1", 8000, "py", cpu=True)
    assert cmd[cmd.index("--block-size") + 1] == "32"
    cmd = engine_command("vllm", str(tmp_path), "127.0.0.1", 8000, "py", ["--block-size=64"], cpu=True)
    assert cmd.count("--block-size") == 0 and cmd[-1] == "--block-size=64"
    # the user's own flags win and are passed through unchanged
    cmd = engine_command("vllm", str(tmp_path), "0.0.0.0", 8000, "py", ["--dtype=bfloat16", "--max-num-seqs", "8"])
    assert "float32" not in cmd and cmd[-3:] == ["--dtype=bfloat16", "--max-num-seqs", "8"]
    cmd = " ".join(engine_command("sglang", str(tmp_path), "h", 1, "py"))
    assert "sglang.launch_server" in cmd and "--is-embedding" in cmd and "--trust-remote-code" in cmd
    with pytest.raises(ServeError, match="lmdeploy serves bfloat16 or float16"):
        engine_command("lmdeploy", str(tmp_path), "h", 1, "py")
    cmd = engine_command("lmdeploy", str(tmp_path), "h", 1, "/x/bin/python", dtype="bfloat16")
    assert cmd[:4] == ["/x/bin/lmdeploy", "serve", "api_server", str(tmp_path)] and "--backend" in cmd


def test_serve_sh_stops_its_engine_on_sigterm(tmp_path):
    """SIGTERM (or Ctrl-C) to serve.sh ends the engine too, at once, and leaves nothing behind."""
    import time

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    pid_file = tmp_path / "engine.pid"
    # A stand-in engine: whatever vLLM's arguments, it answers /health on the port it is given.
    # Not tests/fakes.py's FakeServer (a thread in the test, on a port of its own choosing):
    # serve.sh runs this file as the engine, in its own process, on the port serve.sh names, and
    # the test checks that this very process ends. Importing the fake here would need tests/ on
    # its path and would load torch and polar_xtuner (fakes.py's imports) into a bare stand-in.
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!{sys.executable}
import http.server, os, sys
open({str(pid_file)!r}, "w").write(str(os.getpid()))
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")
    fake.chmod(0o755)
    port = free_port()
    proc, log = _start(["bash", "tools/serve.sh", str(tmp_path), "--port", str(port), "--python", str(fake)],
                       tmp_path / "serve.log", env={"PYTHON": sys.executable})
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=60, interval=0.2)
        deadline = time.time() + 30
        while "ready after" not in open(tmp_path / "serve.log").read() and time.time() < deadline:
            time.sleep(0.1)
        engine = int(pid_file.read_text())
        t0 = time.time()
        proc.send_signal(15)
        code = proc.wait(timeout=30)
        took = time.time() - t0
    finally:
        stop(proc)
        log.close()
    assert code == 128 + 15 and took < 10, (code, took)
    assert not os.path.exists(f"/proc/{engine}") or open(f"/proc/{engine}/stat").read().split(")")[-1].split()[0] == "Z"

