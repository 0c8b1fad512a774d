"""`make bench`'s fleet section: prefix routing against round robin on two real vLLM replicas.

``tools/serve.sh MODEL --replicas 2`` starts two vLLM CPU replicas (our
plugin, prefix caching; a share of the cores each) behind vllm-router. The
same RL groups (8 rollouts per prompt, about 600 tokens a text, in a shuffled
order, as an asynchronous RL framework finishes them) are scored through the
RL reward path (:class:`polar_xtuner.rft.PolarReward`) three ways, in one run:

* ``prefix``: the fleet's address, our client's prefix routing (each
  prompt's rollouts on one replica);
* ``round_robin``: the same replicas, every rollout dealt to the next replica
  (verl's reward router picks the least-busy server per request, which on
  equal replicas spreads a group the same way);
* ``single``: one replica alone, the same groups (the hit rate a fleet should
  keep, and the one-replica throughput the second replica is measured
  against).

Each run starts from empty prefix caches (``/reset_prefix_cache`` on every
replica). A hit rate is ``vllm:prefix_cache_hits`` over
``vllm:prefix_cache_queries`` (tokens), summed over the replicas, from their
``/metrics``. Scores of the three ways are checked equal.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import statistics
import subprocess
import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from bench.report import check, check_scores
from bench.workloads import model_dir, rollout_groups
from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.rl.reward import PolarReward, RFTSettings
from polar_xtuner.scoring.client import http_request, post_json
from polar_xtuner.serve.launcher import REPO, stop
from polar_xtuner.train.launch import free_port, port_is_free

FLEET_MAX_LENGTH, FLEET_MAX_RESPONSE_LENGTH = 1024, 128
# Scores of the same texts from two replicas of one model (fp32 on CPU): equal to float32 rounding.
SCORE_TOLERANCE = 1e-4
_READY = re.compile(r"POLAR reward fleet ready after \d+ s: http://(\S+) ")
_REPLICA = re.compile(r"replica (\d+): (http://\S+) \(pid (\d+)\)")


@dataclass
class RunningFleet:
    """A fleet tools/serve.sh started: the router's address, the replicas' URLs and pids, the launcher."""

    address: str
    replicas: list[str]
    pids: list[int]
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _free_run(n: int) -> int:
    """A port p with p..p+n all free now (the router's and the replicas')."""
    for _ in range(50):
        base = free_port()
        if base + n <= 65535 and all(port_is_free(p) for p in range(base + 1, base + n + 1)):
            return base
    raise RuntimeError(f"no run of {n + 1} free ports found")


@contextlib.contextmanager
def start_fleet(model_dir: str, replicas: int = 2, engine_args: tuple = (), log_path: str | None = None,
                timeout: float = 900.0, env: dict | None = None):
    """``bash tools/serve.sh MODEL --replicas N`` as a user runs it, until its "fleet ready" line.

    Yields a :class:`RunningFleet`; stops the launcher (and so every process
    of the fleet) on the way out.
    """
    port = _free_run(replicas)
    log_path = log_path or os.path.join(os.path.dirname(os.path.abspath(model_dir)), "fleet.log")
    log = open(log_path, "w")
    cmd = ["bash", os.path.join(REPO, "tools", "serve.sh"), model_dir, "--port", str(port), "--replicas",
           str(replicas), *engine_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = open(log_path, encoding="utf-8", errors="replace").read()
            m = _READY.search(text)
            if m:
                found = _REPLICA.findall(text[m.end():])[:replicas]
                yield RunningFleet(m.group(1), [u for _, u, _ in found], [int(p) for _, _, p in found], proc,
                                   log_path)
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tools/serve.sh --replicas {replicas} did not get ready (exit code "
                                   f"{proc.poll()}); its log {log_path} ends:\n{text[-3000:]}")
            time.sleep(0.5)
    finally:
        stop(proc, grace=60)
        log.close()


def prefix_cache_counters(replica: str) -> tuple[float, float]:
    """(hits, queries) in tokens, from a vLLM replica's ``/metrics``."""
    status, body = http_request("GET", replica + "/metrics", timeout=30)
    check(status == 200, f"{replica}/metrics answered HTTP {status}")
    text = body.decode()
    out = []
    for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        check(bool(values), f"{replica}/metrics has no {name}")
        out.append(sum(float(v) for v in values))
    return out[0], out[1]


def reset_prefix_caches(replicas: list[str]) -> None:
    for replica in replicas:
        status, body = post_json(replica + "/reset_prefix_cache", {}, 60)  # VLLM_SERVER_DEV_MODE (serve.sh sets it)
        check(status == 200, f"{replica} refused /reset_prefix_cache: HTTP {status} {body[:200]!r}")


def shuffled_groups(n_groups: int, n_rollouts: int, seed: int) -> tuple[list, list, list]:
    """RL groups in the order an asynchronous RL framework finishes them (shuffled)."""
    prompts, refs, responses = rollout_groups(n_groups, n_rollouts, seed)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order], [refs[i] for i in order], [responses[i] for i in order]


def measure_fleet(fleet: RunningFleet, model_dir: str, n_groups: int = 32, n_rollouts: int = 8,
                  repeats: int = 3, seed: int = 21) -> dict:
    """The fleet figures (module docstring) on a running two-replica fleet."""
    check(len(fleet.replicas) >= 2, f"a fleet of {len(fleet.replicas)} replica(s); the comparison needs two")
    tok = AutoTokenizer.from_pretrained(model_dir)
    work = shuffled_groups(n_groups, n_rollouts, seed)
    n = len(work[0])
    ways = {
        "prefix": (fleet.address, "prefix", fleet.replicas),
        "round_robin": (fleet.address, "round_robin", fleet.replicas),
        "single": (fleet.replicas[0].split("://", 1)[1], "prefix", fleet.replicas[:1]),
    }
    rewards = {name: PolarReward(RFTSettings(server_address=address, model=model_dir, routing=routing), tokenizer=tok)
               for name, (address, routing, _) in ways.items()}
    for reward in rewards.values():
        # Each way once untimed: the fleet's members read, and every batch shape the timed runs send
        # seen by the replicas (vLLM's compiled graph meets a new shape with a slow first call).
        reward.score(*work)
    times = {name: [] for name in ways}
    rates = {name: [] for name in ways}
    scores = {}
    names = list(ways)
    for i in range(repeats):
        for name in names[i % 3:] + names[:i % 3]:  # each goes first once in three
            replicas = ways[name][2]
            reset_prefix_caches(fleet.replicas)
            before = [prefix_cache_counters(r) for r in replicas]
            t0 = time.perf_counter()
            scores[name] = rewards[name].score(*work)
            times[name].append(time.perf_counter() - t0)
            after = [prefix_cache_counters(r) for r in replicas]
            hits = sum(a[0] - b[0] for a, b in zip(after, before))
            queries = sum(a[1] - b[1] for a, b in zip(after, before))
            check(queries > 0, f"{name}: the replicas counted no prefix-cache queries")
            rates[name].append(hits / queries)
    for name in names:
        check_scores(scores[name], n, f"fleet {name}")
    for name in ("round_robin", "single"):
        diff = max(abs(a - b) for a, b in zip(scores[name], scores["prefix"]))
        check(diff <= SCORE_TOLERANCE, f"fleet: {name} and prefix routing disagree on the scores by {diff:.3g}")
    t = {name: statistics.median(v) for name, v in times.items()}
    h = {name: statistics.median(v) for name, v in rates.items()}
    out = {f"fleet_prefix_cache_hit_rate_{name}": h[name] for name in names}
    out.update({f"fleet_rollouts_per_s_{name}": n / t[name] for name in names})
    out["fleet_speedup_prefix_vs_round_robin"] = t["round_robin"] / t["prefix"]
    out["fleet_hit_rate_prefix_over_single"] = h["prefix"] / h["single"] if h["single"] else float("nan")
    out["fleet_scaling_two_vs_one"] = t["single"] / t["prefix"]
    out["fleet_cpu_cores"] = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
    return out


def fleet_throughput(tiny_dir: str, n_groups: int = 16, n_rollouts: int = 8, repeats: int = 3,
                     engine_args: tuple = ()) -> dict:
    """``tools/serve.sh --replicas 2`` measured (:func:`measure_fleet`) on two models.

    ``fleet_*``: the ``fleet_small`` shape (:data:`bench.workloads.SHAPES`;
    the tiny tokenizer, 512 wide, 4 layers), where a token's compute
    outweighs vLLM's handling of it, as a served POLAR's prefill does on a
    GPU. ``fleet_tiny_*``: ``tiny_dir``, the tiny model, whose time on CPU is
    mostly request handling that no routing saves (bench/README.md).
    """
    small = model_dir(os.path.join(os.path.dirname(os.path.abspath(tiny_dir)), "fleet_small"), "fleet_small")
    out = {}
    for key, path in (("fleet", small), ("fleet_tiny", tiny_dir)):
        # As tools/convert.sh leaves a model: its lengths recorded, which the RL reward reads.
        EncodingSettings(FLEET_MAX_LENGTH, FLEET_MAX_RESPONSE_LENGTH).save(path)
        with start_fleet(path, 2, engine_args) as fleet:
            figures = measure_fleet(fleet, path, n_groups, n_rollouts, repeats)
        out.update({key + name[len("fleet"):]: v for name, v in figures.items()})
    return out
