"""Issue 27's network fault classes, each for every client that meets it.

* deadlines: a server that never answers, stalls after its headers, trickles
  a byte every tenth of a second, sends half its body or an empty one is given up
  on within ``timeout x attempts + backoff`` (+1 s), by eval_pref's remote
  scoring, the RL reward functions, the sigmoid probe, the served-dtype check,
  bench's calls (``post_json``) and serve.sh's readiness wait;
* answers are matched to texts by their ``index``, and indices that are not a
  permutation of the request are refused;
* the sigmoid probe tells raw scores from sigmoids by their values, within
  what bf16 serving gives;
* a server's 400 for an over-long text names ``--max-length`` and its limit;
* serve.sh refuses a taken port before the engine starts, and runs under a
  python without xtuner.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from common import REPO, load_tool, run_tool
from fakes import FakeServer, fault, reply, trickle
from polar_xtuner.scoring.client import RemoteScorer, RemoteScoringError, TextTooLongError, http_request, post_json
from polar_xtuner.rl.reward import PolarReward, RFTSettings
from polar_xtuner.serve.launcher import ServeError, wait_ready

pytestmark = pytest.mark.integration

RECORD = {"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b"}
KINDS = ("silent", "stall", "trickle", "trickle_keepalive", "half_body", "empty")
SLACK = 1.0  # seconds over timeout x attempts + backoff
# Seconds per attempt where the client is built in the test: four trickled bytes fit in one,
# so only a whole-request deadline stops a trickle (a per-read timeout never fires). Short,
# as every case waits it out twice.
TIMEOUT = 0.4
TRICKLE_S = 0.1


@pytest.fixture
def fault_server(request):
    """A server answering every request with one fault of KINDS (fakes.fault), trickling a byte every TRICKLE_S."""
    with FakeServer(answer=fault(request.param, every=TRICKLE_S)) as server:
        yield server


def timed(fn, *args, **kw):
    """(result or the exception raised, seconds)."""
    t0 = time.monotonic()
    try:
        out = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - returned for the test to check
        out = e
    return out, time.monotonic() - t0


def side_by_side(calls):
    """``timed`` of each named call, all at once: {name: (result or exception, seconds)}.

    Each case waits out a deadline of its own against a server of its own, so
    they run together: the test takes one deadline, not one per case, and each
    case's time is still its own (the clock starts in its thread).
    """
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(timed, fn) for name, fn in calls.items()}
        return {name: f.result() for name, f in futures.items()}


def eval_in_process(capsys, tiny_dir, tmp_path, server_type, address, *flags):
    """tools/eval_pref.py's main in this process: (exit code, the error lines, seconds)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(RECORD) + "\n")
    main = load_tool("eval_pref").main
    capsys.readouterr()
    t0 = time.monotonic()
    code = main(["--model", tiny_dir, "--data", str(data), "--server-type", server_type,
                 "--server-address", address, "--concurrency", "1", *flags])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("error:")], took


# -- 1. deadlines ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_type", ["vllm", "lmdeploy", "sglang"])
def test_remote_scoring_gives_up_within_its_deadline(server_type):
    """Every fault of KINDS, side by side, each against a server of its own."""
    with ExitStack() as stack:
        servers = {kind: stack.enter_context(FakeServer(answer=fault(kind, every=TRICKLE_S))) for kind in KINDS}
        scorers = {kind: RemoteScorer(server_type, server.address, timeout=TIMEOUT, max_retries=2, backoff=0.2,
                                      concurrency=1) for kind, server in servers.items()}
        got = side_by_side({kind: lambda s=scorer: s.score(["a", "b"]) for kind, scorer in scorers.items()})
    for kind, (err, took) in got.items():
        assert scorers[kind].batch_deadline_s == pytest.approx(TIMEOUT * 2 + 0.2)
        assert isinstance(err, RemoteScoringError) and "failed after 2 attempt(s)" in str(err), (kind, err)
        assert "\n" not in str(err)
        assert took <= TIMEOUT * 2 + 0.2 + SLACK, (kind, took)
        assert len(servers[kind].requests) == 2, kind  # bounded retries


@pytest.mark.slow  # each case waits out its deadline
@pytest.mark.parametrize("fault_server", KINDS, indirect=True)
def test_eval_pref_gives_up_within_its_deadline(fault_server, capsys, tiny_dir, tmp_path):
    code, errors, took = eval_in_process(capsys, tiny_dir, tmp_path, "vllm", fault_server.address,
                                         "--timeout", str(TIMEOUT), "--max-retries", "2")
    assert code == 3 and len(errors) == 1 and "failed after 2 attempt(s)" in errors[0], errors
    assert took <= TIMEOUT * 2 + 0.5 + SLACK, took  # eval_pref's backoff: 0.5 s before the second attempt


@pytest.mark.parametrize("fault_server", ["silent", "trickle", "half_body"], indirect=True)
def test_rl_reward_functions_give_up_within_their_deadline(fault_server, tokenizer):
    settings = RFTSettings(server_address=fault_server.address, timeout=TIMEOUT, max_retries=2, concurrency=1)
    reward = PolarReward(settings, tokenizer=tokenizer)
    bound = TIMEOUT * 2 + reward.scorer.backoff + SLACK
    fallback = PolarReward(RFTSettings(server_address=fault_server.address, timeout=TIMEOUT, max_retries=2,
                                       fallback_score=-7.0), tokenizer=tokenizer)
    got = side_by_side({
        "batch": lambda: reward.score(["q"], ["r"], ["a"]),  # verl's batch manager
        "one": lambda: reward.submit("q", "r", "a").result(),  # verl's reward loop, OpenRLHF
        "fallback": lambda: fallback.score(["q"], ["r"], ["a"]),
    })
    err, took = got["batch"]
    assert isinstance(err, RemoteScoringError) and took <= bound, (err, took)
    err, took = got["one"]
    assert isinstance(err, RemoteScoringError) and took <= bound + reward.gather_s, (err, took)
    scores, took = got["fallback"]
    assert scores == [-7.0] and took <= bound and fallback.fallback_uses == 1


def test_the_sigmoid_probe_served_dtype_and_bench_calls_have_deadlines():
    # raw scores inside [0, 1] (so the probe is asked), and a probe that never answers
    probe_stalls = FakeServer("vllm", scores=[0.25], activation="stall", vllm_lists=True, indices="order",
                              protocol="HTTP/1.1")
    with probe_stalls, FakeServer(answer=fault("trickle", TRICKLE_S)) as trickling:
        probing = RemoteScorer("vllm", probe_stalls.address, timeout=1, max_retries=1)
        got = side_by_side({
            "probe": lambda: probing.score([[1], [2]]),  # the batch answers at once; the probe gets its own timeout
            "dtype": RemoteScorer("vllm", trickling.address, timeout=1).served_dtype,  # eval_pref's dtype note
            # bench's direct call (POST /reset_prefix_cache) and any GET
            "post": lambda: post_json(f"http://{trickling.address}/reset_prefix_cache", {}, 1),
            "get": lambda: http_request("GET", f"http://{trickling.address}/health", None, 1),
        })
    err, took = got["probe"]
    assert isinstance(err, RemoteScoringError) and "activation check failed" in str(err), err
    assert took <= 1 + SLACK, took
    dtype, took = got["dtype"]
    assert dtype is None and took <= 1 + SLACK, (dtype, took)
    for call in ("post", "get"):
        err, took = got[call]
        assert isinstance(err, TimeoutError) and took <= 1 + SLACK, (call, err, took)


def test_serve_readiness_wait_has_a_deadline():
    # /health trickles a byte every half second: each poll used a 5 s per-read timeout, which every byte reset
    with FakeServer(answer=trickle(every=0.5)) as server:
        err, took = timed(wait_ready, f"http://{server.address}/health", None, 2, 0.2)
    assert isinstance(err, ServeError) and "did not answer within 2 s" in str(err) and took <= 2 + SLACK, (err, took)


# -- 2. answers matched by their index ---------------------------------------------------------------------


def indexed_server(mode, indices="reverse"):
    """Scores each text by minus its length, raw (no probe needed); entries last first, numbered by ``indices``."""
    return FakeServer(mode, scores=lambda texts: [-float(len(t)) for t in texts], activation="never", indices=indices)


@pytest.mark.parametrize("mode", ["vllm", "lmdeploy"])
def test_answers_in_reverse_order_follow_their_texts(mode):
    with indexed_server(mode) as server:
        texts = [[0] * n for n in (1, 2, 3, 4, 5)] if mode == "vllm" else ["x" * n for n in (1, 2, 3, 4, 5)]
        assert RemoteScorer(mode, server.address, concurrency=1).score(texts) == [-1.0, -2.0, -3.0, -4.0, -5.0]


@pytest.mark.parametrize("indices", ["duplicate", "missing", "some"])
def test_indices_that_are_not_a_permutation_are_refused(indices, capsys, tiny_dir, tmp_path):
    with indexed_server("vllm", indices) as server:
        with pytest.raises(RemoteScoringError, match="indices .* not each of 0..2 once"):
            RemoteScorer("vllm", server.address, concurrency=1).score([[1], [2, 2], [3, 3, 3]])
        code, errors, _ = eval_in_process(capsys, tiny_dir, tmp_path, "vllm", server.address)
    assert code == 3 and len(errors) == 1 and "cannot be matched to the texts" in errors[0], errors


# -- 3. the sigmoid probe ----------------------------------------------------------------------------------


def jitter_server(scores, activation, drift):
    """A vLLM-shaped server whose scores move with the batch, as bf16 on a GPU does.

    A request of 8 texts (the scored batch) gets each score plus ``drift``;
    a smaller one (the probe's 4) gets it as is. activation: "never" (ignores
    the request field, answers raw), "honour" (sigmoid unless use_activation
    is false), "always" (ignores the field, always sigmoid). JSON lists, numbered.
    """
    def drifting(texts):
        return [scores[i % len(scores)] + (drift if len(texts) >= 8 else 0.0) for i in range(len(texts))]

    return FakeServer("vllm", scores=drifting, activation=activation, vllm_lists=True, indices="order")


@pytest.mark.parametrize("scores, activation, drift", [
    ([-3.5, -9.75, 2.25, -0.5], "never", 1e-4),  # raw, ignoring the field: 1e-4 apart between batch sizes
    ([-3.5, -9.75, 2.25, -0.5], "honour", 1e-4),
    ([-3.5, -9.75, 2.25, -0.5], "never", 0.0625),  # bf16's step at 8-16
    ([0.25, 0.75, 0.5, 0.125], "honour", 1e-4),  # raw inside [0, 1]: the probe answers their sigmoids
    ([0.25, 0.75, 0.5, 0.125], "honour", 4e-3),  # bf16's step at 0.5-1
])
def test_raw_scores_that_drift_between_batch_sizes_are_accepted(scores, activation, drift):
    with jitter_server(scores, activation, drift) as server:
        got = RemoteScorer("vllm", server.address, concurrency=1).score([[1]] * 8)
    assert got == pytest.approx([scores[i % 4] + drift for i in range(8)], abs=1e-6)


@pytest.mark.parametrize("scores", [[-3.5, -9.75, 2.25, -0.5], [-12.0, -11.5, -10.25, -8.0], [0.25, 0.75, 0.5, 0.125]])
@pytest.mark.parametrize("drift", [0.0, 1e-4, 4e-3])
def test_sigmoid_outputs_are_still_refused(scores, drift):
    with jitter_server(scores, "always", drift) as server:
        with pytest.raises(RemoteScoringError, match="does not give raw scores"):
            RemoteScorer("vllm", server.address, concurrency=1).score([[1]] * 8)


# -- 4. a text longer than the server's limit --------------------------------------------------------------

# vLLM 0.32's answer (vllm/renderers/params.py, VLLMValidationError, through create_error_response)
VLLM_TOO_LONG = {"error": {"message": "This model's maximum context length is 64 tokens. However, your prompt "
                           "contains 70 input tokens, which exceeds this limit even without any output tokens. "
                           "Please reduce the length of the input prompt. (parameter=input_tokens, value=70)",
                           "type": "BadRequestError", "param": "input_tokens", "code": 400}}


def test_a_400_for_a_text_over_the_servers_limit_names_max_length(capsys, tiny_dir, tmp_path):
    with FakeServer(answer=reply(400, VLLM_TOO_LONG)) as server:
        with pytest.raises(TextTooLongError, match="limit of 64 tokens.*--max-length 64"):
            RemoteScorer("vllm", server.address).score([[1] * 70])
        code, errors, _ = eval_in_process(capsys, tiny_dir, tmp_path, "vllm", server.address)
    assert code == 2 and len(errors) == 1, errors
    assert "--max-length 64" in errors[0] and "maximum context length is 64" in errors[0], errors
    # another 400 stays what it was: exit 3, the server's words
    with FakeServer(answer=reply(400, {"error": {"message": "unknown field 'foo'", "code": 400}})) as server:
        code, errors, _ = eval_in_process(capsys, tiny_dir, tmp_path, "vllm", server.address)
    assert code == 3 and len(errors) == 1 and "--max-length" not in errors[0] and "unknown field" in errors[0]


# -- 5. serve.sh: a taken port, a python without xtuner ----------------------------------------------------


def python_without_xtuner():
    """.venv-serve's python (vLLM, this package --no-deps, no xtuner), else a python3 on PATH without xtuner."""
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('xtuner') is not None)"
    for py in (os.path.join(REPO, ".venv-serve", "bin", "python"), shutil.which("python3")):
        if py and os.path.exists(py) and subprocess.run([py, "-c", check], capture_output=True).returncode == 0:
            return py
    pytest.skip("no python without xtuner here (.venv-serve, or python3 on PATH)")


def model_dir_like(tiny_dir, dst):
    """The tiny model's config, tokenizer and shipped code (no weights: serve.sh refuses before they load)."""
    os.makedirs(dst)
    for name in os.listdir(tiny_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_dir, name), dst)
    return str(dst)


def test_serve_refuses_a_taken_port_before_starting_the_engine(tiny_dir, tmp_path, taken_port):
    model = model_dir_like(tiny_dir, tmp_path / "model")
    port = taken_port
    t0 = time.monotonic()
    res = run_tool("bash", "tools/serve.sh", model, "--port", str(port), "--python", sys.executable,
                   env={"PYTHON": sys.executable}, timeout=120)
    took = time.monotonic() - t0
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith("error:") and f"--port {port}" in last and "in use" in last, (
        res.stderr[-2000:])
    assert "$ " not in res.stdout and took < 12, (res.stdout, took)  # no engine command was started


def test_serve_runs_under_a_python_without_xtuner(tiny_dir, tmp_path, taken_port):
    py = python_without_xtuner()
    model = model_dir_like(tiny_dir, tmp_path / "model")
    port = str(taken_port)  # the port check is the last step before the engine: reaching it is enough
    # the shipped code is found without importing xtuner (the training venv's, beside the package)
    res = run_tool("bash", "tools/serve.sh", model, "--port", port, "--python", py, env={"PYTHON": py})
    assert res.returncode == 2 and "Traceback" not in res.stderr and f"--port {port}" in res.stderr, (
        res.stderr[-2000:])
    # and still checked: a planted file is refused
    with open(os.path.join(model, "modeling_internlm2.py"), "a") as f:
        f.write("\nimport os  # planted\n")
    res = run_tool("bash", "tools/serve.sh", model, "--port", port, "--python", py, env={"PYTHON": py})
    assert res.returncode == 2 and "did not ship" in res.stderr, res.stderr[-2000:]
    # a clone without the training venv: one line naming xtuner, or the flag to go on unchecked
    clone = tmp_path / "clone"
    shutil.copytree(os.path.join(REPO, "polar_xtuner"), clone / "polar_xtuner",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "tools"), clone / "tools")
    res = run_tool("bash", str(clone / "tools" / "serve.sh"), model, "--port", port, "--python", py,
                   env={"PYTHON": py}, cwd=tmp_path)  # not REPO: `python -m` puts the cwd first
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "xtuner" in errors[0], res.stderr[-2000:]
    assert "--trust-remote-code" in errors[0] and "Traceback" not in res.stderr
    res = run_tool("bash", str(clone / "tools" / "serve.sh"), model, "--port", port, "--python", py,
                   "--trust-remote-code", env={"PYTHON": py}, cwd=tmp_path)
    assert res.returncode == 2 and f"--port {port}" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
