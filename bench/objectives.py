"""What each loss option does to the demo: `make demo` with it on, against the published loss.

Usage:
    python -m bench.objectives [--out bench/results/objectives.json] [--seed 0]

Runs ``scripts/demo.sh`` four times (same seed, same data): the published
Bradley-Terry loss, ``margin`` (records get a margin of 2.0 on the English
topics and 0.5 on the Chinese ones; ``polar_xtuner.demo.data.with_margins``), ``center_rewards_coefficient=0.01``
and ``loss_in_fp32``. For each it records the held-out accuracy and the
held-out scores' mean, standard deviation and mean chosen-rejected gap, and
prints the table bench/README.md and docs/training.md keep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import REPO, RESULTS
from bench.report import check, cpu_name, run_command
from polar_xtuner.demo.data import with_margins, write_jsonl
from polar_xtuner.records import load_records

VARIANTS = {
    "published (Bradley-Terry)": "",
    "margin": "model.margin=True",
    "center_rewards_coefficient=0.01": "model.center_rewards_coefficient=0.01",
    "loss_in_fp32": "model.loss_in_fp32=True",
}


def run(name: str, options: str, work: str, seed: int, margin_data: str) -> dict:
    demo_dir = os.path.join(work, name.split(" ")[0].split("=")[0])
    env = dict(os.environ, DEMO_DIR=demo_dir, DEMO_SEED=str(seed), DEMO_OPTIONS=options,
               TINY_DIR=os.path.join(work, "tiny"), MIN_ACCURACY="0")
    if name == "margin":
        env["DEMO_TRAIN"] = margin_data
    t0 = time.time()
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
    check(proc.returncode == 0, f"{name}: scripts/demo.sh failed (exit {proc.returncode}): {last}")
    with open(os.path.join(demo_dir, "scores.jsonl")) as f:
        scores = [json.loads(line) for line in f]
    topics = [r["category"] for r in load_records(os.path.join(REPO, "data", "demo", "val.jsonl"))]
    check(len(scores) == len(topics), f"{name}: {len(scores)} scored pairs of the {len(topics)} held out")
    flat = [s[k] for s in scores for k in ("chosen", "rejected")]
    gap = {lang: statistics.fmean(s["chosen"] - s["rejected"] for s in scores
                                  if topics[s["line"] - 1].endswith(lang)) for lang in ("_en", "_zh")}
    with open(os.path.join(demo_dir, "eval.json")) as f:
        accuracy = json.load(f)["accuracy"]
    return {
        "variant": name,
        "cfg_options": options,
        "accuracy": accuracy,
        "score_mean": statistics.fmean(flat),
        "score_std": statistics.pstdev(flat),
        "mean_gap": statistics.fmean(s["chosen"] - s["rejected"] for s in scores),
        "mean_gap_en": gap["_en"],  # margin 2.0 in the margin run
        "mean_gap_zh": gap["_zh"],  # margin 0.5
        "seconds": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(RESULTS, "objectives.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        margin_data = os.path.join(work, "train_margins.jsonl")
        write_jsonl(margin_data, with_margins(load_records(os.path.join(REPO, "data", "demo", "train.jsonl"))))
        rows = [run(name, opts, work, args.seed, margin_data) for name, opts in VARIANTS.items()]
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "seed": args.seed, "runs": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| loss | held-out accuracy | score mean | score std | mean gap, English / Chinese topics |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['accuracy']:.3f} | {r['score_mean']:.2f} | {r['score_std']:.2f} "
              f"| {r['mean_gap_en']:.2f} / {r['mean_gap_zh']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
