"""Let torchrun's CPU ranks through mmengine's distributed init.

``NPROC_PER_NODE=2 xtuner train ...`` starts torchrun workers, and each one
calls mmengine's ``_init_dist_pytorch``, which runs
``torch.cuda.set_device(local_rank)`` whenever no MLU/NPU/MUSA is found. On a
machine without CUDA that raises before gloo is ever reached. xtuner parses
configs in mmengine's lazy-import mode, so nothing in a config runs early
enough to help, and xtuner's DeepSpeed strategy has no hook before the call.

The fix lives at interpreter start-up: ``make setup`` (or
``python -m polar_xtuner.cpu_ranks --install``) writes a one-line ``.pth`` file
into the environment's site-packages that calls :func:`install`. It costs one
environment lookup per interpreter, does nothing outside torchrun workers
(``LOCAL_RANK`` unset), and inside them only wraps ``_init_dist_pytorch`` once
mmengine imports it. When CUDA is available the wrapper calls the original
unchanged, so GPU runs are not affected.

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
PTH_NAME = "polar_xtuner_cpu_ranks.pth"
# The whole .pth line runs at start-up: keep it to an environment check.
PTH_LINE = ("import os; 'LOCAL_RANK' in os.environ and "
            "__import__('polar_xtuner.cpu_ranks').cpu_ranks.install()\n")


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


def patch(module) -> None:
    """Patch an imported ``mmengine.dist.utils`` (idempotent)."""
    init = module._init_dist_pytorch
    if not getattr(init, "polar_cpu_ranks", False):
        module._init_dist_pytorch = _without_cuda_set_device(init)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``mmengine.dist.utils`` with the other finders, patches it once loaded."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
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
    """Patch mmengine now if it is imported, else when it is."""
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
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


if __name__ == "__main__":
    from .errors import cli

    cli(main)
