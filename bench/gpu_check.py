"""Every GPU path in one prepared run: the driver behind scripts/gpu_check.sh.

Usage:
    bash scripts/gpu_check.sh RESULTS_DIR               # on the GPU machine (1.8B shape, bf16)
    bash scripts/gpu_check.sh RESULTS_DIR --cpu-smoke   # every step at the tiny shape on CPU

The steps are :mod:`bench.gpu_steps` (its docstring lists them). Each runs in a
process of its own under a time budget (on the GPU a fresh interpreter,
``python -m bench.gpu_check --step NAME``; in the CPU smoke a fork of the
driver, which imports the shared packages once). When it ends, its figures
(or its error) are added to RESULTS_DIR/results.json, and its output to
RESULTS_DIR/log.txt, so a run that is cut off keeps what it measured. A step
that fails is recorded and the next one runs; steps that need an earlier
one's output (a checkpoint) say so and are skipped. The exit code is 0 when
every step passed, 1 otherwise, 2 for bad arguments or RESULTS_DIR (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from bench import REPO
from bench.gpu_steps import STEPS, Context, StepFailed
from polar_xtuner.cli.flags import ArgumentParser, float_in
from polar_xtuner.errors import UserError

STEP = {step.name: step for step in STEPS}


def run_one(name: str, work: str, smoke: bool) -> int:
    """Child process: one step; its figures or error go to WORK/NAME.json."""
    ctx = Context(work, smoke)
    result_path = ctx.path(f"{name}.json")
    try:
        figures = STEP[name].run(ctx)
        result = {"ok": True, **figures}
    except StepFailed as e:
        result = {"ok": False, "error": str(e), **e.figures}
    except BaseException as e:  # noqa: BLE001 - recorded, and the next step runs
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0 if result["ok"] else 1


def _warm_up_imports() -> None:
    """CPU smoke only: import once what the steps share, before they fork from here.

    Every fresh interpreter paid these 5-8 s again (13 steps: about a minute of
    the smoke's 100 s on 2 cores). Only imports: no tensor work and no thread
    pool starts in this process, so each forked step begins as a fresh one would.
    The GPU run keeps a fresh interpreter per step, as the users' commands have.
    """
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    import bench.convert_memory  # noqa: F401
    import bench.gpu_sections  # noqa: F401  (the ZeRO, packing and scoring steps)
    import bench.recipe_gradients  # noqa: F401
    import bench.shared_prefix  # noqa: F401


def _step_in_fork(name: str, work: str, log, budget: float) -> bool:
    """Run one step in a forked child writing to ``log``; True when it was killed at its budget."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: one step, then out without running the parent's exit handlers
        rc = 1
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.chdir(REPO)
            rc = run_one(name, work, True)
        except BaseException:  # noqa: BLE001 - run_one records step errors; this is a last resort
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    deadline = time.monotonic() + budget
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.05)
    return False


def prepare_results_dir(path: str, force: bool) -> str | None:
    """Make RESULTS_DIR ready for a new run without losing an earlier one's results.

    An existing folder with files is refused unless ``force``; then it is moved
    aside to ``RESULTS_DIR.<YYYYmmdd-HHMMSS>`` whole. The folder is created and a
    file written and removed in it, so a read-only place fails here, before any step.

    Returns:
        Where the earlier files went, or None.

    Raises:
        UserError: one line naming RESULTS_DIR: a file, an earlier run without
            ``--force``, or a folder that cannot be created or written.
    """

    where = f"RESULTS_DIR {path}"
    aside = None
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{where}: is a file, expected a folder for results.json and log.txt")
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise UserError(f"{where} holds an earlier run's files ({', '.join(sorted(os.listdir(path))[:4])}); "
                            "name a new folder, or pass --force to move them aside to "
                            f"{os.path.basename(os.path.abspath(path))}.<time>")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = f"{os.path.abspath(path)}.{stamp}", 1
        while os.path.exists(aside):
            n += 1
            aside = f"{os.path.abspath(path)}.{stamp}-{n}"
        try:
            os.rename(path, aside)
        except OSError as e:
            raise UserError(f"{where}: cannot move the earlier run aside ({e.strerror}); "
                            "name a new folder") from None
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("0")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{where}: not writable ({e.strerror}); choose a writable folder") from None
    return aside


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` whole or not at all: a run cut off mid-write leaves the previous results.json."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--cpu-smoke", action="store_true", help="every step at the tiny shape on CPU")
    p.add_argument("--work", default=None, help="scratch directory (default: a new one under $TMPDIR)")
    p.add_argument("--only", default=None, help="comma-separated steps to run (others are skipped)")
    p.add_argument("--budget", type=float_in(0, low_open=True), default=480,
                   help="seconds for the whole run, a finite number > 0 (default 480)")
    p.add_argument("--force", action="store_true",
                   help="RESULTS_DIR may hold an earlier run: its files are moved aside to RESULTS_DIR.<time>")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    if args.step:
        return run_one(args.step, args.work, args.cpu_smoke)

    if not args.cpu_smoke:
        import torch  # here, not on import: the argument refusals above come first, in one line

        if not torch.cuda.is_available():
            print("error: no CUDA device here; use --cpu-smoke for the CPU run of the same steps", file=sys.stderr)
            return 2
    names = [step.name for step in STEPS]
    only = None if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only or [] if s not in names]
    if unknown:
        print(f"error: --only: unknown step(s) {', '.join(unknown)} (steps: {', '.join(names)})", file=sys.stderr)
        return 2
    try:
        aside = prepare_results_dir(args.results_dir, args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if aside:
        print(f"note: the earlier run's files in {args.results_dir} were moved to {aside}", file=sys.stderr)
    work = args.work or tempfile.mkdtemp(prefix="polar_gpu_check_")
    os.makedirs(work, exist_ok=True)
    results_path = os.path.join(args.results_dir, "results.json")
    log_path = os.path.join(args.results_dir, "log.txt")
    results = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "steps": {}}
    write_json(results_path, results)
    deadline = time.monotonic() + args.budget
    fork_steps = args.cpu_smoke and hasattr(os, "fork")
    warm = False  # the shared imports, done before the first step that runs (none, with --budget 0)
    for step in STEPS:
        name, need = step.name, step.needs
        if only is not None and name not in only:
            continue
        if need and not results["steps"].get(need, {}).get("ok") and (only is None or need in only):
            results["steps"][name] = {"ok": False, "skipped": f"needs step {need}, which did not pass"}
            write_json(results_path, results)
            continue
        left = deadline - time.monotonic()
        own = step.smoke_budget_s if args.cpu_smoke else step.gpu_budget_s
        budget = min(own, left) if name.startswith("pytest") else min(left, 3 * own)
        if left < 5:
            results["steps"][name] = {"ok": False, "skipped": "the run's time budget was spent"}
            write_json(results_path, results)
            continue
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n===== {name} (budget {budget:.0f} s) =====\n")
            log.flush()
            if fork_steps:
                if not warm:
                    _warm_up_imports()
                    warm = True
                timed_out = _step_in_fork(name, work, log, max(budget, 1))
            else:
                cmd = [sys.executable, "-m", "bench.gpu_check", args.results_dir, "--step", name, "--work", work]
                if args.cpu_smoke:
                    cmd.append("--cpu-smoke")
                try:
                    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=max(budget, 1))
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
        step_json = os.path.join(work, f"{name}.json")
        if timed_out:
            res = {"ok": False, "error": f"killed after its budget of {budget:.0f} s"}
        elif os.path.exists(step_json):
            with open(step_json) as f:
                res = json.load(f)
        else:
            res = {"ok": False, "error": "the step's process died without a result (see log.txt)"}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results["steps"][name] = res
        write_json(results_path, results)
        status = "ok" if res["ok"] else f"FAILED: {res.get('error') or res.get('skipped')}"
        print(f"{name:18s} {res['wall_s']:7.1f} s  {status}", flush=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["all_ok"] = all(r.get("ok") for r in results["steps"].values())
    results["summary"] = summary(results)
    write_json(results_path, results)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results["all_ok"] else 1


def summary(results: dict) -> dict:
    """The figures other checks read (issue #44's keys), from the steps' results; None where not measured."""
    steps = results.get("steps", {})

    def fig(step, *keys):
        node = steps.get(step, {})
        if not node.get("ok"):
            return None
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def passed(step):  # None where the step was not in the run
        return bool(steps[step].get("ok")) if step in steps else None

    return {
        "mfu_shipped_1_8b": fig("variants", "shared", "shipped", "mfu"),
        "hfu_shipped_1_8b": fig("variants", "shared", "shipped", "hfu"),
        "tokens_per_s_shipped_1_8b": fig("variants", "shared", "shipped", "tokens_per_s"),
        "mfu_7b": fig("train_7b", "shared", "shipped", "mfu"),
        "shared_prefix_train_speedup_long_reference_1_8b":
            fig("shared_prefix", "shared_prefix_train_speedup_long_reference"),
        "convert_bf16_ok": passed("convert_zero2"),
        "pytest_gpu_ok": passed("pytest_gpu"),
        "device": fig("versions", "gpu") or ("cpu" if results.get("mode") == "cpu-smoke" else None),
        "date": results.get("started", "")[:10] or None,
    }


if __name__ == "__main__":
    sys.exit(main())
