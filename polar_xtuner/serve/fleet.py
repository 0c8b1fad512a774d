"""A scoring fleet: N engines with POLAR's flags behind vllm-router, on one address.

``tools/serve.sh MODEL_DIR --replicas N`` lands here. Each replica is the
engine :func:`polar_xtuner.serve.launcher.engine_command` builds (our vLLM
plugin, prefix caching, raw scores) on its own port and its own GPUs (or CPU
cores); vllm-router runs in front, on ``--port``, with health checks every
two seconds.

Who decides where a text goes: our client (:mod:`polar_xtuner.scoring.fleet`),
not the router. vllm-router 0.1.17 sends ``/pooling`` and ``/classify``
through its transparent proxy, where its ``cache_aware`` policy finds no text
to match and sends every request to one worker, and ``consistent_hash`` keys
on a request header (``X-Session-ID``) or else a per-request value
(docs/serving.md, "A fleet", has the measurements). So the router keeps
health and membership: the client reads its worker list (``GET /workers``)
and places each prompt's rollouts on one replica itself. Other clients that
post to the router address still get a healthy replica per request
(``consistent_hash``: the same ``X-Session-ID``, the same replica).

The fleet is supervised: a replica that exits is started again on its port
(at most :data:`MAX_RESTARTS` times each), and the router's health checks
take it back once it answers. Ctrl-C or SIGTERM stops the router and every
replica with their worker processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from polar_xtuner.errors import UserError

ROUTER_POLICIES = ("consistent_hash", "round_robin", "power_of_two", "random", "cache_aware")
# How often the router checks each replica, and how many misses mark it down.
HEALTH_INTERVAL_S = 2
# A replica that keeps dying is left down after this many restarts.
MAX_RESTARTS = 5


class FleetError(UserError):
    """The fleet cannot start as asked: one ``error:`` line, exit code 2."""


@dataclass
class Replica:
    """One engine of the fleet: its launch command, environment and running process."""

    index: int
    port: int
    url: str
    cmd: list[str]
    env: dict
    proc: subprocess.Popen | None = None
    restarts: int = 0
    given_up: bool = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Fleet:
    """The router and the replicas (:func:`polar_xtuner.serve.launcher.main` starts and stops them)."""

    replicas: list[Replica]
    router_cmd: list[str]
    router: subprocess.Popen | None = None


def router_binary(python: str) -> str:
    """vllm-router's console script beside the engine's interpreter, or on PATH.

    Raises:
        FleetError: It is installed in neither place.
    """
    beside = os.path.join(os.path.dirname(python), "vllm-router")
    if os.path.exists(beside):
        return beside
    found = shutil.which("vllm-router")
    if found:
        return found
    raise FleetError(f"--replicas needs vllm-router, which is not installed beside {python} nor on PATH: "
                     f"{os.path.dirname(python)}/pip install vllm-router==0.1.17 (`make serve-setup` does)")


def advertised_host(host: str) -> str:
    """The host name clients use to reach the replicas (the router lists them by it)."""
    if host not in ("0.0.0.0", "::"):
        return host
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def replica_ports(port: int, n: int) -> list[int]:
    """The replicas' ports: the N ports after the router's.

    Raises:
        FleetError: They would pass 65535.
    """
    if port + n > 65535:
        raise FleetError(f"--port {port} --replicas {n}: the replicas take ports {port + 1}-{port + n}, past 65535; "
                         f"pick a lower --port")
    return [port + 1 + i for i in range(n)]


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without it, or when it fails)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _tensor_parallel(extra: list[str]) -> int:
    for i, a in enumerate(extra):
        for flag in ("--tensor-parallel-size", "-tp"):
            if a == flag and i + 1 < len(extra):
                return int(extra[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    return 1


def device_envs(n: int, on_gpu: bool, extra: list[str], environ=None) -> list[dict]:
    """Each replica's share of the machine, as environment variables.

    On GPUs: ``CUDA_VISIBLE_DEVICES``, the next ``--tensor-parallel-size``
    GPUs each (of those already visible). On CPU: vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND``, an equal slice of this process's cores
    each (replicas that shared cores would slow each other down); nothing
    when there are fewer cores than replicas, or the user set the binding.

    Raises:
        FleetError: Fewer GPUs than the replicas need.
    """
    env = os.environ if environ is None else environ
    if on_gpu:
        tp = _tensor_parallel(extra)
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpu_count())]
        if len(devices) < n * tp:
            raise FleetError(f"--replicas {n} with tensor parallel size {tp} needs {n * tp} GPUs; "
                             f"{len(devices)} are visible")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i * tp:(i + 1) * tp])} for i in range(n)]
    if env.get("VLLM_CPU_OMP_THREADS_BIND"):
        return [{} for _ in range(n)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = len(cores) // n
    if per < 1:
        return [{} for _ in range(n)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[i * per:(i + 1) * per]))} for i in range(n)]


def router_command(binary: str, host: str, port: int, worker_urls: list[str], health_path: str,
                   policy: str = "consistent_hash", metrics_port: int | None = None) -> list[str]:
    """vllm-router's launch command for the replicas at ``worker_urls``."""
    cmd = [binary, "--host", host, "--port", str(port), "--worker-urls", *worker_urls, "--policy", policy,
           "--health-check-endpoint", health_path, "--health-check-interval-secs", str(HEALTH_INTERVAL_S),
           "--health-failure-threshold", "1", "--health-success-threshold", "1",
           "--health-check-timeout-secs", str(HEALTH_INTERVAL_S), "--log-level", "warning"]
    if metrics_port:
        # Its Prometheus exporter binds 29000 by default: a second fleet on the machine would fail there.
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    return cmd


def supervise(fleet: Fleet, poll_s: float = 1.0, out=None) -> int:
    """Keep the fleet up until the router exits: restart replicas that exit, and say so.

    Returns:
        The router's exit code; 1 when every replica is down for good.
    """
    out = out or sys.stdout
    while True:
        if fleet.router.poll() is not None:
            print(f"the router exited with code {fleet.router.returncode}; stopping the replicas", file=out,
                  flush=True)
            return fleet.router.returncode or 1
        for r in fleet.replicas:
            if r.given_up or r.running:
                continue
            code = r.proc.returncode if r.proc is not None else None
            if r.restarts >= MAX_RESTARTS:
                r.given_up = True
                print(f"replica {r.index} ({r.url}) exited with code {code} after {r.restarts} restarts; it stays "
                      f"down, the router sends its share to the others", file=out, flush=True)
                continue
            try:  # what the dead engine left running (its engine-core workers) goes first
                os.killpg(r.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, AttributeError):
                pass
            r.restarts += 1
            print(f"replica {r.index} ({r.url}) exited with code {code}; starting it again "
                  f"(restart {r.restarts} of {MAX_RESTARTS})", file=out, flush=True)
            r.start()
            print(f"  replica {r.index}: {r.url} (pid {r.proc.pid})", file=out, flush=True)
        if all(r.given_up for r in fleet.replicas):
            print("every replica is down for good; stopping", file=out, flush=True)
            return 1
        time.sleep(poll_s)
