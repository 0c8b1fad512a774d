"""The training command behind the launchers in ``scripts/``.

It is the command ``xtuner train`` builds: torchrun over xtuner's
``tools/train.py`` with ``--launcher pytorch`` when ``NNODES`` or
``NPROC_PER_NODE`` is above 1, plain python otherwise, with the same
environment variables. Four things differ:

* the launchers run it directly, so a failed run exits non-zero (``xtuner
  train`` drops its child's exit code and always exits 0);
* ``--resume auto`` resumes from the checkpoint the work dir's
  ``last_checkpoint`` names, looked up inside the work dir as the converter
  does (or starts from scratch, saying so, when there is none); xtuner 0.2.0
  would look for a file named "auto";
* when resuming, checkpoints are unpickled with ``weights_only=False``
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``): xtuner reads the seed back with
  torch's defaults, which refuse mmengine checkpoints since torch 2.6. Only
  resume from checkpoints you wrote;
* the rendezvous port is free: on one node a free port is picked when ``PORT``
  is unset (one DeepSpeed process took 29500, so a second run on the machine
  failed; xtuner's torchrun takes a random port, unchecked), and a taken
  ``PORT`` is refused before anything starts. A single process gets the
  full ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
  set: DeepSpeed opens a rendezvous port even for one process and, missing any
  of the five, "discovers" them through MPI and resets the port to 29500.

Plain ``xtuner train`` (one process, not through the launchers) gets the same
five variables from :func:`ensure_rendezvous_env`, through
:func:`prepare_training_process`, which the start-up file that ``make setup``
installs (``python -m polar_xtuner.cpu_ranks --install``) calls when xtuner's
``tools/train.py`` starts: mmengine parses configs lazily, so no config code
runs before DeepSpeed does, and importing the package sets nothing up.

Usage (the scripts do this):
    python -m polar_xtuner.train.launch CONFIG [xtuner train arguments...]
prints the command, NUL-separated, for ``mapfile -d ''``;
    python -m polar_xtuner.train.launch --port NAME
prints $NAME's port when it is free (else exits 2 saying it is taken), or a
free port when NAME is unset.

Environment (xtuner's names):
    NNODES          nodes in the job (default 1)
    NODE_RANK       this node's index, 0..NNODES-1 (default 0)
    NPROC_PER_NODE  processes on this node, one per GPU (default 1)
    ADDR            address of node 0 (default 127.0.0.1)
    PORT            rendezvous port on node 0 (default: a free port on one
                    node, 29500 across nodes; node 0 refuses a taken one)
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys

from polar_xtuner.cli.entry import cli, end_without_collection, entry_point, start_tool
from polar_xtuner.constants import MKL_CBWR
from polar_xtuner.errors import EXIT_USER, UserError

DEFAULT_PORT = 29500  # torchrun's and DeepSpeed's; the nodes of a job must agree on it
# Set by MPI launchers and srun: a value above 1 means several processes that DeepSpeed's
# MPI discovery must find, so a plain single-process setting would be wrong there.
_MULTI_TASK_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


class LaunchError(UserError):
    """A launch mistake: bad arguments or environment. Exit code 2."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a rendezvous server could listen on ``port`` on every interface here.

    Binds as torch's TCPStore does (``SO_REUSEADDR``, so connections of an
    earlier run in TIME_WAIT do not count), on IPv4 and, where the machine has
    it, IPv6. Raises the OSError of a failure other than "in use" on IPv4
    (e.g. a privileged port).
    """
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return False
                if family == socket.AF_INET:
                    raise
    return True


def ensure_rendezvous_env(environ=None, program=None) -> dict:
    """Give a plain single ``xtuner train`` process a free DeepSpeed rendezvous port.

    DeepSpeed opens a rendezvous port even for one process. Unless all of
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK are set it
    "discovers" them through MPI, which sets MASTER_PORT to 29500 (whatever the
    environment said), so a second run on the machine failed with EADDRINUSE
    (and ``xtuner train`` still exited 0). Here, when neither RANK nor
    WORLD_SIZE is set (not a torchrun or DeepSpeed-launcher process) and no MPI
    launcher or srun started several tasks, the missing ones are set for one
    process: MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port, RANK=0,
    WORLD_SIZE=1, LOCAL_RANK=0. A MASTER_ADDR, MASTER_PORT or LOCAL_RANK
    already set is kept (xtuner's train.py sets LOCAL_RANK=0 itself).

    Called without ``environ`` (as ``polar_xtuner.train.model`` does at import), it
    acts on ``os.environ`` only in xtuner's ``tools/train.py``, so importing the
    model elsewhere (tests, tools, RL workers) leaves the environment of the
    process, and of everything it starts, alone. ``program`` (default
    ``sys.argv[0]``) is the script checked.

    Args:
        environ: the mapping to fill (default ``os.environ``).
        program: the script path to check for xtuner's train.py; checked only
            when given or when ``environ`` is None.

    Returns:
        The variables it set (empty when it left the environment alone).
    """
    if environ is None or program is not None:
        path = os.path.normpath(sys.argv[0] if program is None else program)
        if path.split(os.sep)[-3:] != ["xtuner", "tools", "train.py"]:
            return {}
    environ = os.environ if environ is None else environ
    if environ.get("RANK") or environ.get("WORLD_SIZE"):
        return {}
    for name in _MULTI_TASK_VARS:
        try:
            if int(environ.get(name) or 1) > 1:
                return {}
        except ValueError:
            return {}
    added = {name: value for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                                             ("LOCAL_RANK", "0")) if not environ.get(name)}
    if not environ.get("MASTER_PORT"):
        added["MASTER_PORT"] = str(free_port())
    environ.update(added)
    return added


def prepare_training_process() -> None:
    """Set up the ``xtuner train`` process, from the start-up file, before any of its code runs.

    ``xtuner train``'s CLI is not ours and mmengine parses configs lazily, so
    the interpreter's start-up is the entry point: bit-reproducible MKL (see
    :data:`polar_xtuner.constants.MKL_CBWR`; a value the user set is kept) and,
    for a plain one-process run, DeepSpeed's rendezvous variables
    (:func:`ensure_rendezvous_env`, a no-op outside xtuner's ``tools/train.py``).
    """
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    refuse_gpu_dtype_without_gpu(sys.argv)
    ensure_rendezvous_env()
    # Registered before any other exit handler, so it runs after all of them (checkpoints, logs and
    # TensorBoard are closed by then): the process then ends without a collection over the whole
    # heap, 1.9 s of CPU per training process (polar_xtuner.cli.entry.end_without_collection).
    atexit.register(end_without_collection)


def lighten_xtuner_cli(argv: list[str]) -> bool:
    """Spare ``xtuner train``'s own process the import of the script it only starts; True if done.

    xtuner 0.2.0's CLI finds ``tools/train.py`` by importing it (``from xtuner.tools
    import train`` for its ``__file__``), which imports mmengine's runner, transformers
    and DeepSpeed: about 4 s of CPU in a process that then only waits for the child
    that imports them again (and, with NPROC_PER_NODE, for torchrun). The start-up file
    calls this in the CLI's process: the module is registered by its file alone, so the
    CLI starts the same script, with the same arguments, 4 s sooner.
    """
    if len(argv) < 2 or os.path.basename(argv[0]) != "xtuner" or argv[1].lower() != "train":
        return False
    import importlib.util

    if "xtuner.tools.train" in sys.modules:
        return False
    try:
        script = xtuner_train_script()  # located, not run (the CLI imports the xtuner package anyway)
    except LaunchError:
        return False  # the CLI then says what is missing itself
    # the module with its spec and __file__, never executed
    stand_in = importlib.util.module_from_spec(importlib.util.spec_from_file_location("xtuner.tools.train", script))
    sys.modules["xtuner.tools.train"] = stand_in
    return True


def refuse_gpu_dtype_without_gpu(argv: list[str]) -> None:
    """Exit with one line where ``--deepspeed`` names a JSON that picks its dtype from a CUDA GPU, and there is none.

    xtuner's ``deepspeed_zero*`` and this project's GPU JSONs say ``"enabled": "auto"``
    for bf16/fp16; xtuner resolves it with ``torch.<device>.is_bf16_supported()``,
    which ``torch.cpu`` lacks: the README's command on a login node or a first try
    without a GPU ended in an AttributeError traceback.
    """
    try:
        _, value = _option(argv[1:], "--deepspeed")
    except LaunchError:
        return  # xtuner's own parser reports it
    if not value:
        return
    path = value
    if not os.path.isfile(path):
        import importlib.util

        spec = importlib.util.find_spec("xtuner")
        if spec is None or not spec.submodule_search_locations:
            return
        path = os.path.join(list(spec.submodule_search_locations)[0], "configs", "deepspeed", f"{value}.json")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except (OSError, ValueError):
        return  # xtuner names a missing or bad file itself
    if not any(isinstance(ds.get(k), dict) and ds[k].get("enabled") == "auto" for k in ("bf16", "fp16")):
        return
    import torch

    if not torch.cuda.is_available():
        print(f"error: --deepspeed {value} picks bf16 or fp16 from a CUDA GPU, and this machine has none; on CPU "
              "use --deepspeed configs/deepspeed/polar_zero2_cpu.json (zero1, zero3: their _cpu twins)",
              file=sys.stderr, flush=True)
        os._exit(EXIT_USER)  # at interpreter start-up (the start-up file): SystemExit would be a fatal site error


def single_process_env(port: int | None = None) -> dict:
    """DeepSpeed's five rendezvous variables for one process (a free port when ``port`` is None)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port() if port is None else port),
            "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def _int_env(env, name: str, default: int, low: int = 1) -> int:
    raw = env.get(name, "") or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise LaunchError(f"{name}={value} must be at least {low}")
    return value


def _option(args: list[str], name: str):
    """(index, value) of ``--name value`` or ``--name=value``; (None, None) if absent."""
    for i, a in enumerate(args):
        if a == name:
            if i + 1 >= len(args):
                raise LaunchError(f"{name} needs a value")
            return i, args[i + 1]
        if a.startswith(name + "="):
            return i, a.split("=", 1)[1]
    return None, None


def work_dir_of(config: str, args: list[str]) -> str:
    """The work dir xtuner uses: ``--work-dir``, else work_dirs/<config name>."""
    _, work_dir = _option(args, "--work-dir")
    return work_dir or os.path.join("work_dirs", os.path.splitext(os.path.basename(config))[0])


def resolve_resume(config: str, args: list[str]) -> tuple[list[str], bool]:
    """Replace ``--resume auto`` by the last checkpoint's path.

    Returns:
        The arguments, and whether the run resumes from a checkpoint.
    """
    i, value = _option(args, "--resume")
    if i is None:
        return list(args), False
    args = list(args)
    width = 1 if "=" in args[i] else 2
    if value != "auto":
        if not os.path.exists(value):
            raise LaunchError(f"--resume {value}: no such checkpoint")
        return args, True
    # Lazy: the start-up file imports this module in every Python process of the venv,
    # and the checkpoint layer brings torch; only --resume auto needs it.
    from polar_xtuner.train.checkpoint import POINTER, CheckpointError, checkpoint_in_work_dir

    work_dir = work_dir_of(config, args)
    if not os.path.isfile(os.path.join(work_dir, POINTER)):
        print(f"--resume auto: no checkpoint in {work_dir}; starting from scratch", file=sys.stderr)
        return args[:i] + args[i + width:], False
    try:  # the converter's rule: the checkpoint of that name inside this work dir
        path = checkpoint_in_work_dir(work_dir)
    except CheckpointError as e:
        raise LaunchError(f"--resume auto: {e}") from None
    print(f"--resume auto: resuming from {path}", file=sys.stderr)
    return args[:i] + ["--resume", path] + args[i + width:], True


def xtuner_train_script() -> str:
    """Path of xtuner's tools/train.py (found without running it)."""
    import importlib.util

    spec = importlib.util.find_spec("xtuner.tools.train")
    if spec is None or not spec.origin:
        raise LaunchError("xtuner is not installed in this environment (run `make setup`)")
    return spec.origin


def check_sequence_parallel(config: str) -> None:
    """Refuse sequence parallel where it cannot run, before any rank starts."""
    from mmengine.config import Config

    try:
        size = int(Config.fromfile(config).get("sequence_parallel_size", 1) or 1)
    except Exception as e:  # noqa: BLE001 - xtuner will report the details
        raise LaunchError(f"config {config}: cannot read it ({e})") from None
    if size > 1:
        # Lazy for the same reason: the model module brings torch and xtuner.
        from polar_xtuner.train.model import SP_NEEDS_GPU, flash_attn_available

        if not flash_attn_available():  # flash-attn importable and a CUDA device present
            raise LaunchError(f"{config}: {SP_NEEDS_GPU}")


def _port_env(env, name: str) -> int:
    port = _int_env(env, name, DEFAULT_PORT)
    if port > 65535:
        raise LaunchError(f"{name}={port} is not a TCP port (1..65535)")
    return port


def _require_free(port: int, name: str, taken: str) -> int:
    """``port``, or a LaunchError saying ``taken`` when something here listens on it."""
    try:
        free = port_is_free(port)
    except OSError as e:
        raise LaunchError(f"{name}={port}: cannot listen on it here ({e.strerror}); set {name} to "
                          f"another port") from None
    if not free:
        raise LaunchError(taken)
    return port


def local_port(env, names=("PORT",)) -> int:
    """The port of the first of ``names`` set in ``env``, checked free; a free port when none is set."""
    name = next((n for n in names if env.get(n)), None)
    if name is None:
        return free_port()
    port = _port_env(env, name)
    return _require_free(port, name, f"{name} {port} is taken on this machine (another job?); set {name} to "
                                     f"a free port, or leave it unset to get one")


def _rendezvous(env, nnodes: int, nproc: int, node_rank: int) -> tuple[dict, int | None]:
    """(variables for a single process, torchrun's master port)."""
    if nnodes > 1:
        port = _port_env(env, "PORT")
        if node_rank != 0:  # the port is node 0's; only node 0 can check it
            return {}, port
        return {}, _require_free(port, "PORT", f"PORT {port} is taken on this node (another job?); set PORT "
                                               f"to a free port, the same on every node")
    # One node: a free port unless PORT (or, for one process, MASTER_PORT) names one.
    if nproc == 1 and env.get("MASTER_PORT") and env.get("RANK"):
        return {}, None  # the user's (or an outer launcher's) rendezvous: left as it is
    port = local_port(env, ("PORT",) if nproc > 1 else ("PORT", "MASTER_PORT"))
    # One process: DeepSpeed still opens a rendezvous port (see ensure_rendezvous_env).
    return ({}, port) if nproc > 1 else (single_process_env(port), None)


def command(argv: list[str], env=None) -> list[str]:
    """The full command (with ``env`` prefix) that trains CONFIG."""
    env = os.environ if env is None else env
    if not argv or argv[0].startswith("-"):
        raise LaunchError("usage: CONFIG [xtuner train arguments...]")
    config, rest = argv[0], argv[1:]
    if not os.path.isfile(config):
        raise LaunchError(f"config {config}: no such file")
    if _option(rest, "--launcher")[0] is not None:
        raise LaunchError("--launcher is set by the launcher; leave it out")
    check_sequence_parallel(config)
    rest, resuming = resolve_resume(config, rest)
    nnodes = _int_env(env, "NNODES", 1)
    nproc = _int_env(env, "NPROC_PER_NODE", 1)
    node_rank = _int_env(env, "NODE_RANK", 0, low=0)
    if node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    train_py = xtuner_train_script()
    variables, master_port = _rendezvous(env, nnodes, nproc, node_rank)
    if resuming:
        variables["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    prefix = ["env"] + [f"{k}={v}" for k, v in variables.items()] if variables else []
    if nnodes == 1 and nproc == 1:
        return prefix + [sys.executable, train_py, config] + rest
    return prefix + [
        "torchrun", f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
        f"--master_addr={env.get('ADDR') or '127.0.0.1'}", f"--master_port={master_port}",
        train_py, config, *rest, "--launcher", "pytorch",
    ]


@entry_point
def main(argv=None) -> int:
    """Print the command NUL-separated on stdout; an error is one ``error:`` line and exit 2.

    ``--port NAME`` prints a rendezvous port instead: $NAME when it is set and
    free, else a free one (scripts/demo.sh uses it for MASTER_PORT).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the command
    try:
        if argv[:1] == ["--port"]:
            if len(argv) != 2:
                raise LaunchError("usage: --port NAME (the environment variable that may name a port)")
            result = str(local_port(os.environ, (argv[1],))) + "\n"
        else:
            result = "\0".join(command(argv)) + "\0"
    finally:
        sys.stdout = out
    sys.stdout.write(result)
    return 0


if __name__ == "__main__":
    start_tool()
    cli(main)
