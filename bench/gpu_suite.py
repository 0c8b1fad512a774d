"""`make bench-gpu`: a POLAR-1.8B-shaped random model on one GPU, per ZeRO stage, then scoring.

Usage:
    python -m bench.gpu_suite [--shape 1.8b] [--stages 1,2,3] [--steps 10] [--out bench/results/gpu.json]
    python -m bench.gpu_suite --shape tiny --device cpu --stages 2 --steps 3   # same code on CPU (smoke run)

For each ZeRO stage, a fresh process trains ``PolarRewardModel`` under
DeepSpeed with the repository's own JSON (``configs/deepspeed/polar_zero{N}.json``,
its "auto" values filled as xtuner fills them, bf16 where the GPU has it; the
``_cpu`` twin on CPU), as the 1.8B config sets it up: one packed row of
2 x max_length tokens per step, chat-like pair lengths, the fastest varlen
backend on the machine, activation checkpointing, AdamW. It reports real
tokens/s per GPU, MFU and the peak GPU memory of the training steps. Then
tools/eval_pref.py's scorer (length-sorted batches) gives evaluation pairs/s.
The sections and the FLOP count are :mod:`bench.gpu_sections`.

With one GPU, ZeRO has one rank to partition over, so the per-stage peak
memory shows each stage's own overhead on one GPU; docs/training.md's ZeRO table
gives the per-GPU model-state arithmetic for N GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from bench import REPO, RESULTS
from bench.gpu_sections import eval_throughput, peak_tflops, train_stage
from bench.report import run_command, write_results
from bench.workloads import SHAPES, model_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages, comma-separated (3_offload allowed)")
    p.add_argument("--steps", type=int, default=10, help="training steps per stage (2 are warm-up)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence; rows are twice this (default 16384, tiny: 1024)")
    p.add_argument("--eval-pairs", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    p.add_argument("--out", default=os.path.join(RESULTS, "gpu.json"))
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # internal: one stage in a child process
    p.add_argument("--stage-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    max_length = args.max_length or (1024 if args.shape == "tiny" else 16384)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    if args.steps < 3:
        print(f"error: --steps {args.steps}: at least 3 (the first 2 are warm-up, left out of the figures)",
              file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in ("1", "2", "3", "3_offload")]
    if bad:
        print(f"error: --stages: unknown ZeRO stage(s) {', '.join(bad)} (1, 2, 3, 3_offload)", file=sys.stderr)
        return 2

    if args.stage_json:  # child: one stage, figures to a file
        fig = train_stage(args.model_dir, stages[0], args.steps, args.device, max_length)
        with open(args.stage_json, "w") as f:
            json.dump(fig, f)
        return 0

    peak = peak_tflops(args.device, args.peak_tflops)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"shape": args.shape, "max_packed_length": 2 * max_length, "peak_tflops_bf16_dense": peak}
    with tempfile.TemporaryDirectory(prefix="polar_gpu_bench_") as work:
        path = model_dir(os.path.join(work, "model"), args.shape)
        for stage in stages:
            out = os.path.join(work, f"stage_{stage}.json")
            cmd = [sys.executable, "-m", "bench.gpu_suite", "--shape", args.shape, "--device", args.device,
                   "--stages", stage, "--steps", str(args.steps), "--max-length", str(max_length),
                   "--model-dir", path, "--stage-json", out]
            # DeepSpeed prints its whole config: keep the child's output for a failure only
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
            if proc.returncode != 0 or not os.path.exists(out):
                print(f"error: ZeRO-{stage} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}",
                      file=sys.stderr)
                return 1
            with open(out) as f:
                fig = json.load(f)
            results[f"zero{stage}_train_tokens_per_s_per_gpu"] = fig["tokens_per_s"]
            if peak:
                results[f"zero{stage}_mfu"] = fig["model_flops_per_s"] / (peak * 1e12)
            if "peak_memory_bytes" in fig:
                results[f"zero{stage}_peak_memory_gib"] = fig["peak_memory_bytes"] / 2 ** 30
            results.setdefault("varlen_backend", fig["backend"])
            results.setdefault("params_matmul", fig["params_matmul"])
            results.setdefault("mean_row_tokens", fig["mean_row_tokens"])
            print(f"ZeRO-{stage}: {fig['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        results.update(eval_throughput(path, args.device, args.eval_pairs, max_length))
    write_results(results, args.out, device_name)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
