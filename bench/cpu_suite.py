"""`make bench`: every CPU section on this machine, figures to bench/results/cpu.json.

Usage:
    python -m bench.cpu_suite [--out bench/results/cpu.json] [--steps 30] [--pairs 100000]
        [--skip-data] [--skip-serve] [--skip-fleet] [--skip-shared-prefix] [--convert-shape 1.8b|tiny|none]

Every speed figure is a ratio against a baseline measured in the same run,
interleaved (A, B, A, B ...) so that machine noise hits both sides alike, and
every section checks that its work happened before its figures are recorded
(a failed check stops the run with its one-line reason):

* padding vs packing: the share of real (non-pad) tokens per batch on a
  long-tailed, chat-like length distribution (lognormal, clipped);
* training tokens/s of the tiny model on CPU, packed rows (varlen attention,
  the exact SDPA backend) vs padded batches of the same pairs, with lengths
  from the same distribution scaled to the tiny model's 1024 tokens;
* evaluation pairs/s of tools/eval_pref.py's scorer, batched and length-sorted
  vs one pair at a time (the same scores both ways);
* CPU seconds of a tool's start (a fresh process loading a model and scoring a
  pair as eval_pref does) without torchvision vs with it (the same score);
* shared prefixes against whole sequences, training and local scoring
  (:mod:`bench.shared_prefix`);
* remote scoring against real vLLM servers, our client vs POLAR's, with our
  vLLM plugin and without (:mod:`bench.remote`);
* a fleet of two vLLM replicas behind vllm-router (``tools/serve.sh
  --replicas 2``) on RL groups: our client's prefix routing against round
  robin on the same replicas, and against one replica (:mod:`bench.fleet`);
* validating, tokenizing and packing N synthetic pairs with our builder vs
  xtuner's ``build_preference_dataset(is_reference=True)`` (token ids checked
  equal; two alternating rounds, best time of each side);
* wall time of a one-step ``xtuner train`` on the N-pair file without the
  pre-tokenized cache vs with a warm cache (two alternating rounds, best of each);
* peak memory of the converter on a POLAR-1.8B-shaped random checkpoint
  (:mod:`bench.convert_memory`; fp32 and bf16 output, each read back whole)
  over one fp32 copy of the weights. It needs about 20 GB of disk and a few minutes.

The local sections are :mod:`bench.cpu_sections`. Writes the JSON figures and
prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

from bench import RESULTS
from bench.convert_memory import measure
from bench.fleet import fleet_throughput
from bench.cpu_sections import (
    data_build,
    eval_throughput,
    packing_stats,
    padding_real_fraction,
    startup,
    tool_start,
    train_throughput,
)
from bench.remote import remote_throughput
from bench.report import run_command, write_results
from bench.shared_prefix import run as shared_prefix_run
from bench.workloads import chat_like_lengths, model_dir
from polar_xtuner.demo.data import generate, write_jsonl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(RESULTS, "cpu.json"))
    p.add_argument("--steps", type=int, default=30, help="training steps per side")
    p.add_argument("--pairs", type=int, default=100000, help="synthetic pairs for the data benchmarks")
    p.add_argument("--skip-data", action="store_true", help="skip the (minutes-long) data benchmarks")
    p.add_argument("--skip-serve", action="store_true", help="skip the real-vLLM benchmarks (remote and fleet)")
    p.add_argument("--skip-fleet", action="store_true", help="skip the two-replica fleet benchmark (bench/fleet.py)")
    p.add_argument("--skip-shared-prefix", action="store_true",
                   help="skip shared prefixes against whole sequences (bench/shared_prefix.py)")
    p.add_argument("--convert-shape", default="1.8b", choices=["1.8b", "tiny", "none"],
                   help="model shape for the conversion-memory benchmark (none: skip it)")
    args = p.parse_args(argv)
    random.seed(0)

    # a failed check raises CheckFailed before anything is written (run_command says it in one line)
    results = {}
    lengths = chat_like_lengths(20000, 16384)
    results["padding_real_token_fraction"] = padding_real_fraction(lengths, pairs_per_batch=4)
    results["packing_real_token_fraction"], results["packing_row_fill"] = packing_stats(lengths, 32768)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = model_dir(os.path.join(tmp, "tiny"))
        results.update(train_throughput(tiny, args.steps))
        results.update(eval_throughput(tiny))
        results.update(tool_start(tiny))
        if not args.skip_shared_prefix:
            results.update(shared_prefix_run(tiny))
        if not args.skip_serve:
            results.update(remote_throughput(tiny))
        if not (args.skip_serve or args.skip_fleet):
            results.update(fleet_throughput(tiny))
        if not args.skip_data:
            data_file = os.path.join(tmp, "pairs.jsonl")
            write_jsonl(data_file, generate(args.pairs, 5))
            results.update(data_build(tiny, data_file, args.pairs))
            results.update(startup(tiny, data_file))
    if args.convert_shape != "none":
        with tempfile.TemporaryDirectory(prefix="polar_convert_mem_") as work:
            mem = measure(args.convert_shape, work)
        results.update({k: v for k, v in mem.items() if k.startswith("convert_")})
        results["convert_shape_params"] = mem["params"]
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
