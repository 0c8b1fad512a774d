"""The fleet launcher's parts in-process: ports, shares of the machine, the router's command, supervision, refusals."""
import io
import json
import os
import subprocess
import sys

import pytest

from common import run_in_process
from polar_xtuner.serve import fleet as fleet_mod
from polar_xtuner.serve import launcher
from polar_xtuner.serve.fleet import (
    MAX_RESTARTS,
    Fleet,
    FleetError,
    Replica,
    device_envs,
    replica_ports,
    router_binary,
    router_command,
    supervise,
)


def test_the_replicas_take_the_ports_after_the_routers():
    assert replica_ports(30000, 3) == [30001, 30002, 30003]
    with pytest.raises(FleetError, match="past 65535"):
        replica_ports(65534, 2)


def test_each_replica_gets_its_own_gpus_or_cores(monkeypatch):
    env = {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}
    assert device_envs(4, True, [], env) == [{"CUDA_VISIBLE_DEVICES": d} for d in "2357"]
    assert device_envs(2, True, ["--tensor-parallel-size", "2"], env) == [
        {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "5,7"}]
    assert device_envs(1, True, ["-tp=4"], env) == [{"CUDA_VISIBLE_DEVICES": "2,3,5,7"}]
    with pytest.raises(FleetError, match="needs 6 GPUs; 4 are visible"):
        device_envs(3, True, ["--tensor-parallel-size=2"], env)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4}, raising=False)
    assert device_envs(2, False, [], {}) == [{"VLLM_CPU_OMP_THREADS_BIND": "0,1"},
                                             {"VLLM_CPU_OMP_THREADS_BIND": "2,3"}]
    assert device_envs(6, False, [], {}) == [{}] * 6  # fewer cores than replicas: no binding
    assert device_envs(2, False, [], {"VLLM_CPU_OMP_THREADS_BIND": "0-3|4-7"}) == [{}, {}]  # the user's own


def test_the_router_checks_health_often_and_keeps_its_metrics_port_apart():
    cmd = router_command("/venv/bin/vllm-router", "0.0.0.0", 30000, ["http://h:30001", "http://h:30002"],
                         "/health", "consistent_hash", 41000)

    def value(flag):
        return cmd[cmd.index(flag) + 1]
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--worker-urls") + 3] == ["http://h:30001", "http://h:30002"]
    assert value("--policy") == "consistent_hash" and value("--health-check-interval-secs") == "2"
    assert value("--health-failure-threshold") == "1" and value("--prometheus-port") == "41000"
    assert cmd[0] == "/venv/bin/vllm-router"  # the real router parses these: tests/integration/serve/test_fleet.py


def test_a_missing_router_is_one_clear_error(tmp_path, monkeypatch):
    py = tmp_path / "bin" / "python"
    py.parent.mkdir()
    py.write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FleetError, match="pip install vllm-router==0.1.17"):
        router_binary(str(py))
    (tmp_path / "bin" / "vllm-router").write_text("")
    assert router_binary(str(py)) == str(tmp_path / "bin" / "vllm-router")


def _replica(i, code):
    """A replica whose 'engine' exits at once with ``code`` (a real process)."""
    return Replica(i, 40000 + i, f"http://h:{40000 + i}", [sys.executable, "-c", f"raise SystemExit({code})"],
                   dict(os.environ))


def test_a_replica_that_exits_is_started_again_until_it_is_given_up():
    replicas = [_replica(1, 3)]
    for r in replicas:
        r.start()
    router = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    out = io.StringIO()
    try:
        code = supervise(Fleet(replicas, [], router), poll_s=0.05, out=out)
    finally:
        router.kill()
        router.wait()
    text = out.getvalue()
    assert code == 1 and replicas[0].restarts == MAX_RESTARTS and replicas[0].given_up
    assert text.count("starting it again") == MAX_RESTARTS and "stays down" in text
    assert "every replica is down for good" in text


def test_the_fleet_ends_with_its_router():
    replicas = [Replica(1, 40001, "http://h:40001", [sys.executable, "-c", "import time; time.sleep(60)"],
                        dict(os.environ))]
    replicas[0].start()
    router = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    router.wait()
    try:
        assert supervise(Fleet(replicas, [], router), poll_s=0.05, out=io.StringIO()) == 7
    finally:
        launcher.stop(replicas[0].proc, grace=5)


def test_replicas_are_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    monkeypatch.setattr(launcher, "remote_code_allowed", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "cuda_available", lambda: False)
    monkeypatch.setattr(launcher, "pick_python", lambda *a: str(tmp_path / "nopy" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = run_in_process(launcher.main, [str(d), "--replicas", "2"], capsys)
    assert res.returncode == 2 and "vllm-router" in res.stderr and "Traceback" not in res.stderr
    res = run_in_process(launcher.main, [str(d), "--replicas", "0"], capsys)
    assert res.returncode == 2 and "--replicas" in res.stderr
    monkeypatch.setattr(fleet_mod, "router_binary", lambda python: "/bin/true")
    monkeypatch.setattr(launcher, "router_binary", lambda python: "/bin/true")
    res = run_in_process(launcher.main, [str(d), "--replicas", "2", "--port", "65534"], capsys)
    assert res.returncode == 2 and "past 65535" in res.stderr
