"""What every section shares once it has timed something: the check, the machine, the results file.

A timed section checks that its work happened (scores came back and agree,
the converted directory holds every tensor, the run left its checkpoint)
before it returns a figure; when the check fails it raises :class:`CheckFailed`
with a one-line reason, and nothing is recorded. :func:`write_results` adds
the date and the machine to the figures and writes them under bench/results/.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import torch


class CheckFailed(RuntimeError):
    """A timed section's work did not happen as it should: its figures are not recorded."""


def run_command(main) -> int:
    """``main()`` of a bench command, a failed check said in one line (exit 1) instead of a traceback."""
    try:
        return main()
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def check(ok: bool, reason: str) -> None:
    """Raise :class:`CheckFailed` with ``reason`` (one line) unless ``ok``."""
    if not ok:
        raise CheckFailed(" ".join(reason.split()))


def check_scores(scores, n: int, what: str) -> None:
    """``n`` finite scores came back from ``what``."""
    got = len(scores)
    check(got == n, f"{what}: {got} scores for {n} inputs")
    bad = sum(not math.isfinite(s) for s in scores)
    check(bad == 0, f"{what}: {bad} of {n} scores are not finite")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> str:
    """The machine a figure was measured on: the device (a GPU's name), the CPU, its cores, torch."""
    cpu = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}"
    return f"{device}, {cpu}" if device else cpu


def write_results(results: dict, path: str, device: str | None = None) -> None:
    """Add the machine and date, write the JSON and print a Markdown table of it."""
    results["machine"] = machine(device)
    results["date"] = time.strftime("%Y-%m-%d")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("| figure | value |\n|---|---|")
    for k, v in results.items():
        print(f"| `{k}` | {v:.3f} |" if isinstance(v, float) else f"| `{k}` | {v} |")
