"""`make bench`'s remote section: our scoring client against POLAR's on real vLLM servers.

Remote scoring pairs/s against one vLLM server (the CPU build from
.venv-serve, started as tools/serve.sh starts it): our client (batches in
flight together) against xtuner's ``RewardModelClient`` (POLAR's published
client) on the same records, scores checked equal (rotating order, median of
3, the prefix cache emptied before each run), on short pairs, long pairs and
RL groups of rollouts; the server's own time (pre-built ids), the ceiling of
any client's speedup there; then all again against stock vLLM's per-token
serving, the baseline of our vLLM plugin.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

from transformers import AutoTokenizer
from xtuner.utils import RewardModelClient

from bench.report import check, check_scores
from bench.workloads import long_records, rollout_groups
from polar_xtuner.demo.data import generate
from polar_xtuner.encoding import EncodingSettings, PolarEncoder, pair_items
from polar_xtuner.rl.reward import PolarReward, RFTSettings
from polar_xtuner.scoring.client import RemoteScorer, post_json
from polar_xtuner.scoring.remote import score_records_remote
from polar_xtuner.serve.launcher import CPU_SERVE_VENV, engine_command, engine_env, stop, wait_ready
from polar_xtuner.train.launch import free_port

# Record sets of the remote benchmark: key prefix, the unit counted, and how
# the records are cut (the same lengths for both clients).
REMOTE_SETS = {"short": ("remote", "pairs"), "long": ("remote_long", "pairs"), "rl": ("remote_rl", "rollouts")}
REMOTE_MAX_LENGTH, REMOTE_MAX_RESPONSE_LENGTH = 1024, 128
# Scores of the same texts from two clients, or from two servers of the same model.
SCORE_TOLERANCE = 1e-4


def _remote_round(tiny_dir: str, work: dict, pooler: str | None, repeats: int,
                  engine_args: tuple = (), address: str | None = None) -> tuple[dict, dict]:
    """Median seconds per client and set against one vLLM server started as tools/serve.sh starts it.

    ``work`` maps a name of :data:`REMOTE_SETS` to its records (pair sets)
    or to (prompts, references, responses) (the RL set). Three runs per set:

    * ``ours``: the public path from records to scores, the one
      ``eval_pref --server-type vllm`` takes for pairs and the RL reward
      functions take for rollouts (:class:`polar_xtuner.rft.PolarReward`);
    * ``polar``: xtuner's ``RewardModelClient`` called once on all of them,
      as POLAR's verl recipe calls it per batch;
    * ``server_only``: our scorer sending ids built before the clock starts,
      the server's own time: no client can score these faster against this
      server, so ``polar / server_only`` bounds any client's speedup.

    ``pooler`` overrides the server's pooler config (None: serve.sh's);
    ``engine_args`` go to the engine after serve.sh's own. With ``address``
    (HOST:PORT), a server already running there is used as it is and left
    running, and neither applies. The
    prefix cache is emptied before every timed run, so each run computes
    what a first scoring of these texts computes. Returns the times and our
    client's scores per set (checked equal to POLAR's client's).
    """
    lengths = (REMOTE_MAX_LENGTH, REMOTE_MAX_RESPONSE_LENGTH)
    proc = log = None
    if address is None:
        python = os.path.join(CPU_SERVE_VENV, "bin", "python")
        check(os.path.exists(python), f"no vLLM CPU build at {CPU_SERVE_VENV}; run `make serve-setup`")
        port = free_port()
        extra = (["--pooler-config", pooler] if pooler else []) + list(engine_args)
        cmd = engine_command("vllm", tiny_dir, "127.0.0.1", port, python, extra, max_model_len=REMOTE_MAX_LENGTH,
                             cpu=True)
        log = open(os.path.join(os.path.dirname(tiny_dir), "vllm_bench.log"), "w")
        proc = subprocess.Popen(cmd, env=engine_env("vllm", "127.0.0.1", False), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        address = f"127.0.0.1:{port}"
    base = f"http://{address}"
    times, scores = {}, {}
    try:
        if proc is not None:
            wait_ready(base + "/health", proc, timeout=900)
        tok = AutoTokenizer.from_pretrained(tiny_dir)
        theirs = RewardModelClient(tiny_dir, *lengths, response_cut_side="right", server_type="vllm",
                                   server_address=address)
        for name, recs in work.items():
            if REMOTE_SETS[name][1] == "pairs":
                scorer = RemoteScorer("vllm", address)  # eval_pref's defaults
                enc = PolarEncoder(tok, *lengths)
                data = [{"prompt": r["prompt"], "reference": r["reference"], "output": r[k]}
                        for r in recs for k in ("chosen", "rejected")]
                ids = enc.serving_inputs(pair_items(recs), scorer.server_type)

                def ours(recs=recs, scorer=scorer):
                    return [s for pair in score_records_remote(scorer, tok, recs, *lengths) for s in pair]
            else:
                reward = PolarReward(RFTSettings(server_address=address, model=tiny_dir), tokenizer=tok)
                scorer = reward.scorer
                data = [{"prompt": p, "reference": r, "output": c} for p, r, c in zip(*recs)]
                ids = reward.inputs(*recs)

                def ours(recs=recs, reward=reward):
                    return reward.score(*recs)

            ours()  # warm every path once
            theirs(data[:16])
            runs = {"ours": [], "polar": [], "server_only": []}
            kinds = list(runs)
            got = ref = only = None
            for i in range(repeats):
                for kind in kinds[i % 3:] + kinds[:i % 3]:  # each goes first once in three
                    status, body = post_json(base + "/reset_prefix_cache", {}, 60)  # VLLM_SERVER_DEV_MODE
                    check(status == 200, f"vLLM refused /reset_prefix_cache: HTTP {status} {body[:200]!r}")
                    t0 = time.perf_counter()
                    if kind == "ours":
                        got = ours()
                    elif kind == "polar":
                        ref = theirs(data)
                    else:
                        only = scorer.score(ids)
                    runs[kind].append(time.perf_counter() - t0)
            for what, scored in (("our client", got), ("POLAR's client", ref), ("the server alone", only)):
                check_scores(list(scored or []), len(data), f"{name}: {what}")
            diff = max(abs(a - b) for a, b in zip(got, ref))
            check(diff <= SCORE_TOLERANCE, f"{name}: our client and POLAR's disagree on the same server's scores "
                                           f"by {diff:.3g}")
            times[name] = {k: statistics.median(v) for k, v in runs.items()}
            scores[name] = got
    finally:
        if proc is not None:
            stop(proc)
            log.close()
    return times, scores


def remote_throughput(tiny_dir: str, n_pairs: int = 1000, n_long: int = 200, n_groups: int = 32,
                      n_rollouts: int = 8, repeats: int = 3, engine_args: tuple = (),
                      served_address: str | None = None) -> dict:
    """Pairs (or rollouts)/s of our remote scoring vs POLAR's client against real vLLM servers.

    Three workloads (:data:`REMOTE_SETS`): the demo's short pairs
    (``remote_*``, about 40 tokens a text), long pairs (``remote_long_*``,
    about 780) and RL-shaped groups of rollouts (``remote_rl_*``, 8 per
    prompt, about 600 tokens). Each against the server tools/serve.sh starts
    (with our vLLM plugin: last-token scores, prefix caching) and against
    stock vLLM's per-token serving of the same model (``*_stock_vllm``,
    ``"task": "token_classify"``), the plugin's baseline in the same run.
    ``*_ceiling_vs_polar_client`` is POLAR's client's time over the server's
    own (see :func:`_remote_round`): the most any client could gain there.
    ``engine_args`` are passed to both servers (the tests' ``--enforce-eager``).
    ``served_address`` (HOST:PORT): a server of ``tiny_dir`` that tools/serve.sh
    started (the tests pass a fleet's replica), used for the plugin's round
    instead of starting one; the stock server is started either way.
    """
    # As tools/convert.sh leaves a model: its lengths recorded, which the RL reward reads.
    EncodingSettings(REMOTE_MAX_LENGTH, REMOTE_MAX_RESPONSE_LENGTH).save(tiny_dir)
    work = {"short": list(generate(n_pairs, 11)), "long": long_records(n_long, 12),
            "rl": rollout_groups(n_groups, n_rollouts, 13)}
    served, got = _remote_round(tiny_dir, work, None, repeats, engine_args, served_address)
    stock, got_stock = _remote_round(tiny_dir, work, json.dumps({"use_activation": False, "task": "token_classify"}),
                                     repeats, engine_args)
    out = {}
    for name, (key, unit) in REMOTE_SETS.items():
        diff = max(abs(a - b) for a, b in zip(got[name], got_stock[name]))
        check(diff <= SCORE_TOLERANCE, f"{name}: last-token and per-token serving disagree on the scores by {diff:.3g}")
        n = len(work[name]) if unit == "pairs" else len(work[name][0])
        for suffix, t in (("", served[name]), ("_stock_vllm", stock[name])):
            out[f"{key}_{unit}_per_s{suffix}"] = n / t["ours"]
            out[f"{key}_{unit}_per_s_polar_client{suffix}"] = n / t["polar"]
            out[f"{key}_speedup_vs_polar_client{suffix}"] = t["polar"] / t["ours"]
            out[f"{key}_{unit}_per_s_server_only{suffix}"] = n / t["server_only"]
            out[f"{key}_ceiling_vs_polar_client{suffix}"] = t["polar"] / t["server_only"]
        out[f"{key}_plugin_speedup"] = stock[name]["ours"] / served[name]["ours"]
        out[f"{key}_plugin_speedup_polar_client"] = stock[name]["polar"] / served[name]["polar"]
    return out
