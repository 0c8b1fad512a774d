"""`make bench`'s remote section end to end: plugin and stock vLLM servers of a fresh tiny model.

The plugin's server is a replica of the session's ``scoring_fleet`` (tests/conftest.py:
tools/serve.sh's engine, on the model the fleet serves), so this file shares a work unit
with integration/serve/test_fleet.py and runs before it; the stock server is started
here, as `make bench` starts both. It does not need the session's trained demo, so
under xdist it runs beside the demo's work unit.
"""
import math
import os

import pytest

from bench.remote import REMOTE_SETS, remote_throughput
from common import ONE_PROCESS_ENGINE
from polar_xtuner.serve.launcher import CPU_SERVE_VENV

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serving]


def _need_serve_venv():
    if not os.path.exists(os.path.join(CPU_SERVE_VENV, ".plugin")):
        pytest.fail(f"vLLM's CPU build is missing at {CPU_SERVE_VENV}: run `make serve-setup` (make test does)")


def test_bench_remote_section_on_small_sets(scoring_fleet, monkeypatch):
    """`make bench`'s remote section end to end on a few records of each workload.

    bench.remote.remote_throughput raises CheckFailed when a client's scores
    are missing, or our client and POLAR's disagree on a server's scores, or
    the plugin and stock servers disagree; every figure must come back. Its
    speeds are benchmark figures, not asserted here.
    """
    _need_serve_venv()
    tiny, running = scoring_fleet
    for key, value in ONE_PROCESS_ENGINE.items():  # the stock server's engine as the replicas' (tests/common.py)
        monkeypatch.setenv(key, value)
    # Eager, as the fleet's replicas: what is checked here does not depend on vLLM's compiled graph,
    # which costs each server 8-17 s of its start on 2 cores; `make bench` and tools/serve.sh keep vLLM's default.
    out = remote_throughput(tiny, n_pairs=16, n_long=4, n_groups=2, n_rollouts=4, repeats=1,
                            engine_args=("--enforce-eager",), served_address=running.replicas[0].split("://")[1])
    expected = set()
    for key, unit in REMOTE_SETS.values():
        expected |= {f"{key}_plugin_speedup", f"{key}_plugin_speedup_polar_client"}
        for suffix in ("", "_stock_vllm"):
            expected |= {f"{key}_{unit}_per_s{suffix}", f"{key}_{unit}_per_s_polar_client{suffix}",
                         f"{key}_{unit}_per_s_server_only{suffix}", f"{key}_speedup_vs_polar_client{suffix}",
                         f"{key}_ceiling_vs_polar_client{suffix}"}
    assert set(out) == expected
    assert "remote_speedup_vs_polar_client" in out  # issue #15's key
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out
