"""The training command behind the launchers in ``scripts/``.

It is the command ``xtuner train`` builds: torchrun over xtuner's
``tools/train.py`` with ``--launcher pytorch`` when ``NNODES`` or
``NPROC_PER_NODE`` is above 1, plain python otherwise, with the same
environment variables. Three things differ:

* the launchers run it directly, so a failed run exits non-zero (``xtuner
  train`` drops its child's exit code and always exits 0);
* ``--resume auto`` resumes from the work dir's ``last_checkpoint`` (or starts
  from scratch, saying so, when there is none); xtuner 0.2.0 would look for a
  file named "auto";
* when resuming, checkpoints are unpickled with ``weights_only=False``
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``): xtuner reads the seed back with
  torch's defaults, which refuse mmengine checkpoints since torch 2.6. Only
  resume from checkpoints you wrote.

Usage (the scripts do this):
    python -m polar_xtuner.launch CONFIG [xtuner train arguments...]
prints the command, NUL-separated, for ``mapfile -d ''``.

Environment (xtuner's names):
    NNODES          nodes in the job (default 1)
    NODE_RANK       this node's index, 0..NNODES-1 (default 0)
    NPROC_PER_NODE  processes on this node, one per GPU (default 1)
    ADDR            address of node 0 (default 127.0.0.1)
    PORT            rendezvous port on node 0 (default 29500)
"""

from __future__ import annotations

import os
import sys

DEFAULT_PORT = 29500


class LaunchError(Exception):
    """A launch mistake: bad arguments or environment. Exit code 2."""


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
    work_dir = work_dir_of(config, args)
    marker = os.path.join(work_dir, "last_checkpoint")
    if not os.path.isfile(marker):
        print(f"--resume auto: no checkpoint in {work_dir}; starting from scratch", file=sys.stderr)
        return args[:i] + args[i + width:], False
    with open(marker) as f:
        path = f.read().strip()
    if not os.path.exists(path):
        raise LaunchError(f"{marker} names {path}, which does not exist")
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
        from .model import SP_NEEDS_GPU, flash_attn_available

        if not flash_attn_available():  # flash-attn importable and a CUDA device present
            raise LaunchError(f"{config}: {SP_NEEDS_GPU}")


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
    prefix = ["env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"] if resuming else []
    if nnodes == 1 and nproc == 1:
        return prefix + [sys.executable, train_py, config] + rest
    return prefix + [
        "torchrun", f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
        f"--master_addr={env.get('ADDR') or '127.0.0.1'}",
        f"--master_port={_int_env(env, 'PORT', DEFAULT_PORT)}",
        train_py, config, *rest, "--launcher", "pytorch",
    ]


def main(argv=None) -> int:
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the command
    try:
        cmd = command(sys.argv[1:] if argv is None else argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = out
    sys.stdout.write("\0".join(cmd) + "\0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
