"""How robustly `make demo` learns: the whole demo over seeds and torch thread counts.

Usage:
    python -m bench.demo_seeds [--seeds 0 1 2 3 4] [--threads 1 2] [--jobs 2]
        [--config configs/POLAR_tiny_full_varlenattn_demo.py] [--options "KEY=VALUE ..."] [--margins]
        [--out bench/results/demo_seeds.json]

Each run is ``scripts/demo.sh`` with ``DEMO_SEED=S`` (the tiny model's random
weights, xtuner's ``randomness.seed`` and the packing order all change with it)
and ``OMP_NUM_THREADS=T`` (a different thread count sums in a different order,
which is how the demo's result came to depend on the CPU). ``--config`` runs another
demo config through the same pipeline (``DEMO_CONFIG``), e.g. the LoRA one; ``--options`` adds
xtuner ``--cfg-options`` (``DEMO_OPTIONS``), and ``--margins`` trains on the demo data with
margins (``DEMO_TRAIN``; ``polar_xtuner.demo.data.with_margins``), as
tests/e2e/test_lora_demo.py trains. It records the
held-out accuracy, the validation curve and the wall time of each run, and
prints the table that bench/README.md keeps. Runs with one thread may go
``--jobs`` at a time; runs with more threads always go alone, so their wall
time is the one `make demo` would take.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench import REPO, RESULTS
from bench.report import cpu_name
from polar_xtuner.demo.data import with_margins, write_jsonl
from polar_xtuner.records import load_records

DEFAULT_CONFIG = "configs/POLAR_tiny_full_varlenattn_demo.py"


def run_one(seed: int, threads: int, root: str, config: str = DEFAULT_CONFIG, options: str = "",
            train: str | None = None) -> dict:
    """One whole demo; returns its figures (accuracy None when it failed).

    ``options`` are scripts/demo.sh's DEMO_OPTIONS, ``train`` its DEMO_TRAIN (None: the demo data).
    """
    demo_dir = os.path.join(root, f"seed{seed}_threads{threads}")
    env = dict(os.environ, DEMO_DIR=demo_dir, TINY_DIR=os.path.join(demo_dir, "tiny_polar"),
               DEMO_SEED=str(seed), MIN_ACCURACY="0", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), DEMO_CONFIG=config, DEMO_OPTIONS=options)
    if train:
        env["DEMO_TRAIN"] = train
    env.pop("MASTER_PORT", None)  # demo.sh picks a free one per run
    start = time.time()
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    row = {"seed": seed, "threads": threads, "wall_s": round(wall, 1), "accuracy": None, "curve": {}}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-500:]
        return row
    with open(os.path.join(demo_dir, "eval.json")) as f:
        row["accuracy"] = json.load(f)["accuracy"]
    with open(os.path.join(demo_dir, "train.log"), errors="replace") as f:
        row["curve"] = {int(i): float(a) for i, a in re.findall(r"iter (\d+) val/pref_accuracy ([0-9.]+)", f.read())}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--jobs", type=int, default=2, help="one-thread runs at a time")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="demo config (scripts/demo.sh's DEMO_CONFIG)")
    p.add_argument("--options", default="", help="xtuner --cfg-options, space-separated (DEMO_OPTIONS)")
    p.add_argument("--margins", action="store_true", help="train on the demo data with margins (DEMO_TRAIN)")
    p.add_argument("--root", default=os.path.join(REPO, "work_dirs", "demo_seeds"))
    p.add_argument("--out", default=os.path.join(RESULTS, "demo_seeds.json"))
    args = p.parse_args(argv)
    if args.jobs < 1 or min(args.threads) < 1:
        p.error("--jobs and --threads must be >= 1")

    train = None
    if args.margins:
        os.makedirs(args.root, exist_ok=True)
        train = os.path.join(args.root, "train_margins.jsonl")
        write_jsonl(train, with_margins(load_records(os.path.join(REPO, "data", "demo", "train.jsonl"))))
    rows = []
    single = [(s, 1) for s in args.seeds if 1 in args.threads]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(lambda st: run_one(*st, args.root, args.config, args.options, train), single):
            rows.append(row)
            print(json.dumps(row), flush=True)
    for t in sorted(set(args.threads) - {1}):
        for s in args.seeds:
            row = run_one(s, t, args.root, args.config, args.options, train)
            rows.append(row)
            print(json.dumps(row), flush=True)

    accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    summary = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "config": args.config,
        "options": args.options,
        "margins": args.margins,
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
        "min_accuracy": min(accs) if accs else None,
        "median_accuracy": statistics.median(accs) if accs else None,
        "failed_runs": sum(r["accuracy"] is None for r in rows),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)

    steps = sorted({i for r in rows for i in r["curve"]})
    print(f"\n{summary['machine']}, {summary['date']}\n")
    print("| seed | threads | " + " | ".join(f"val @ {i}" for i in steps) + " | held-out accuracy | wall (s) |")
    print("|---" * (len(steps) + 4) + "|")
    for r in sorted(rows, key=lambda r: (r["threads"], r["seed"])):
        curve = " | ".join(f"{r['curve'][i]:.3f}" if i in r["curve"] else "-" for i in steps)
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "failed"
        print(f"| {r['seed']} | {r['threads']} | {curve} | {acc} | {r['wall_s']:.0f} |")
    print(f"\nmin {summary['min_accuracy']}, median {summary['median_accuracy']}, "
          f"failed {summary['failed_runs']}")
    return 0 if summary["failed_runs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
