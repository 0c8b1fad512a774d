"""Let torchrun's CPU ranks through mmengine's distributed init.

``NPROC_PER_NODE=2 xtuner train ...`` starts torchrun workers, and each one
calls mmengine's ``_init_dist_pytorch``, which runs
``torch.cuda.set_device(local_rank)`` whenever no MLU/NPU/MUSA is found. On a
machine without CUDA that raises before gloo is ever reached. xtuner parses
configs in mmengine's lazy-import mode, so nothing in a config runs early
enough to help, and xtuner's DeepSpeed strategy has no hook before the call.

The fix lives at interpreter start-up: ``make setup`` (or
``python -m polar_xtuner.cpu_ranks --install``) writes a one-line ``.pth`` file
into the environment's site-packages that calls :func:`install`. The same line
sets up a plain ``xtuner train`` process (xtuner's ``tools/train.py``):
:func:`polar_xtuner.train.launch.prepare_training_process`. It costs one
environment lookup per interpreter, does nothing outside torchrun workers
(``LOCAL_RANK`` unset), and inside them only wraps ``_init_dist_pytorch`` once
mmengine imports it. When CUDA is available the wrapper calls the original
unchanged, so GPU runs are not affected.

The same hook makes DeepSpeed's asynchronous all-gathers complete before they
return on CPU ranks. DeepSpeed 0.16's ZeRO-3 launches one async all-gather per
parameter and waits only for the last; on CUDA one stream orders them, but
gloo runs each on its own thread, so a parameter could be read before its
gather finished: a ZeRO-3 run on two CPU ranks turned NaN about one run in
eight under load (upstream fix: deepspeedai/DeepSpeed#8539, September 2026).
Waiting at launch costs the overlap, which CPU ranks (tests, demos) do not need.

Usage:
    python -m polar_xtuner.cpu_ranks --install     # write the .pth file
    python -m polar_xtuner.cpu_ranks --uninstall   # remove it
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys

TARGET = "mmengine.dist.utils"
DS_COMM = "deepspeed.comm"
# deepspeed.comm's collectives that ZeRO launches with async_op=True.
DS_GATHERS = ("all_gather", "all_gather_into_tensor", "allgather_fn")
PTH_NAME = "polar_xtuner_cpu_ranks.pth"
# The whole .pth line runs at every interpreter's start-up: keep it to an environment
# and an argv check. Three processes need set-up before any of their code runs: torchrun
# workers (LOCAL_RANK set), xtuner's tools/train.py, whose configs mmengine parses
# lazily, so nothing in a config can run early enough, and the `xtuner` CLI itself
# (polar_xtuner.train.launch.lighten_xtuner_cli).
PTH_LINE = ("import os, sys; 'LOCAL_RANK' in os.environ and "
            "__import__('polar_xtuner.train.cpu_ranks').train.cpu_ranks.install(); "
            "sys.argv and sys.argv[0].endswith(os.path.join('xtuner', 'tools', 'train.py')) and "
            "__import__('polar_xtuner.train.launch').train.launch.prepare_training_process(); "
            "sys.argv and os.path.basename(sys.argv[0]) == 'xtuner' and "
            "__import__('polar_xtuner.train.launch').train.launch.lighten_xtuner_cli(sys.argv)\n")


def _without_cuda_set_device(init):
    """Wrap mmengine's ``_init_dist_pytorch`` to skip the CUDA device pin on CPU."""

    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        import torch

        if torch.cuda.is_available():
            return init(*args, **kwargs)
        real = torch.cuda.set_device
        torch.cuda.set_device = lambda device: None  # CPU ranks have no device to pin
        try:
            return init(*args, **kwargs)
        finally:
            torch.cuda.set_device = real

    wrapper.polar_cpu_ranks = True
    return wrapper


def _completed(gather):
    """Wrap an async deepspeed.comm all-gather so that its work is done when it returns."""

    @functools.wraps(gather)
    def wrapper(*args, **kwargs):
        handle = gather(*args, **kwargs)
        if handle is not None and kwargs.get("async_op"):
            handle.wait()  # gloo: finished, not only enqueued; a later wait() returns at once
        return handle

    wrapper.polar_cpu_ranks = True
    return wrapper


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _patch_mmengine(module) -> None:
    init = module._init_dist_pytorch
    if not getattr(init, "polar_cpu_ranks", False):
        module._init_dist_pytorch = _without_cuda_set_device(init)


def _patch_deepspeed_comm(module) -> None:
    if _cuda():  # one stream orders the gathers: leave DeepSpeed's overlap alone
        return
    for name in DS_GATHERS:
        fn = getattr(module, name, None)
        if fn is not None and not getattr(fn, "polar_cpu_ranks", False):
            setattr(module, name, _completed(fn))


# What is patched, by module, once it is imported.
PATCHES = {TARGET: _patch_mmengine, DS_COMM: _patch_deepspeed_comm}


def patch(module) -> None:
    """Patch an imported ``mmengine.dist.utils`` or ``deepspeed.comm`` (idempotent)."""
    PATCHES[module.__name__](module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the other finders, patches each once loaded."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch mmengine and deepspeed.comm now where imported, else when they are."""
    for name in PATCHES:
        if name in sys.modules:
            patch(sys.modules[name])
    if not all(name in sys.modules for name in PATCHES) and not any(
            isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def pth_path() -> str:
    """Where the start-up file goes: this interpreter's site-packages."""
    import sysconfig

    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m polar_xtuner.cpu_ranks", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--install", action="store_true", help=f"write {PTH_NAME} into site-packages")
    g.add_argument("--uninstall", action="store_true", help=f"remove {PTH_NAME}")
    args = p.parse_args(argv)
    path = pth_path()
    if args.install:
        with open(path, "w") as f:
            f.write(PTH_LINE)
        print(f"wrote {path}")
    elif os.path.exists(path):
        os.remove(path)
        print(f"removed {path}")
    return 0

