"""Shared prefixes against whole sequences, on the same pairs and model, in one run (``make bench``).

Usage:
    python -m bench.shared_prefix [--tiny DIR] [--out bench/results/shared_prefix.json]

For each workload (:func:`bench.workloads.shared_prefix_records`) it builds
both training layouts the way a config does
(:func:`polar_xtuner.data.dataset.pack_pairs` rows of pairs, and
:class:`polar_xtuner.data.shared_prefix.GroupRows` rows of groups, the same row
length), trains the tiny model over every row of each from the same weights
(forward, backward, AdamW) and scores the same records locally both ways:

* ``shared_prefix_token_ratio_*``: packed tokens, unshared over shared;
* ``shared_prefix_train_speedup_*``: training pairs/s, shared over unshared;
* ``shared_prefix_eval_speedup_*``: local scoring pairs/s, shared over unshared.

Before a workload's figures are recorded, both layouts are checked to hold
every pair once, every training loss to be finite, and both scorings to give
the same scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from mmengine import MessageHub
from transformers import AutoTokenizer

from bench import RESULTS
from bench.report import check, check_scores, run_command
from bench.workloads import SHARED_PREFIX_WORKLOADS, model_dir, reward_model, shared_prefix_records
from polar_xtuner.data.dataset import encode_columns, pack_pairs, polar_collate_fn
from polar_xtuner.data.shared_prefix import GroupRows, group_records
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.scoring.local import load_model, score_records

MAX_LENGTH, MAX_RESPONSE_LENGTH = 2048, 1024
# Local scores of one pair, with its prefix shared against whole: the same up to fp32 summation order.
SCORE_TOLERANCE = 1e-3


def layouts(records, tokenizer, row: int):
    """(unshared rows, shared rows, report): both as a config builds them, in record order."""
    enc = PolarEncoder(tokenizer, MAX_LENGTH, MAX_RESPONSE_LENGTH)
    pairs = pack_pairs(encode_columns(records, enc), row, shuffle=False)
    groups, report = group_records(records, enc, row)
    shared = GroupRows(groups, row, shuffle=False)
    unshared_rows = [polar_collate_fn([pairs[i]], use_varlen_attn=True)["data"] for i in range(len(pairs))]
    shared_rows = [polar_collate_fn([shared[i]], use_varlen_attn=True)["data"] for i in range(len(shared))]
    # every pair once in each layout: a figure over fewer pairs would be a faster nothing
    counts = {"unshared": sum(len(r["margins"]) for r in unshared_rows),
              "shared": sum(len(r["shared_prefix"].pairs) for r in shared_rows)}
    for kind, n in counts.items():
        check(n == len(records), f"the {kind} rows hold {n} pairs of the workload's {len(records)}")
    return unshared_rows, shared_rows, report


def _train_seconds(model, rows, device: str = "cpu") -> float:
    """Seconds to train over ``rows`` (forward, backward, AdamW step), after one warm-up row."""
    hub = MessageHub.get_instance("varlen_attn_args")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def step(data) -> torch.Tensor:
        data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        hub.update_info("cumulative_len_rank_0", data.pop("cumulative_len")[0].to(device))
        hub.update_info("max_seqlen_rank_0", data.pop("max_seqlen"))
        try:
            loss = model(data, mode="loss")["loss"]
            loss.backward()
        finally:
            hub.update_info("cumulative_len_rank_0", None)
            hub.update_info("max_seqlen_rank_0", None)
        opt.step()
        opt.zero_grad()
        return loss.detach()

    step(rows[0])
    sync()
    losses = []
    t0 = time.perf_counter()
    for data in rows:
        losses.append(step(data))
    sync()
    seconds = time.perf_counter() - t0
    bad = sum(not torch.isfinite(x).all() for x in losses)
    check(bad == 0, f"{bad} of {len(rows)} training steps gave a non-finite loss")
    return seconds


def run(tiny_dir: str, sizes: dict | None = None, device: str = "cpu", eval_too: bool = True,
        activation_checkpointing: bool = False) -> dict:
    """Every ``shared_prefix_*`` figure of the module docstring.

    Args:
        tiny_dir: The model directory (the tiny model in ``make bench``; the
            1.8B-shaped random model in scripts/gpu_check.sh).
        sizes: Prompts (pairs for ``demo``) per workload.
        device: Where to train and score ("cuda": FlexAttention, compiled).
        eval_too: Also time local scoring.
        activation_checkpointing: The model's setting for both layouts. The
            GPU check passes the shipped recipes' True, so "shared" is the shipped
            default and "unshared" the packed path; ``make bench`` keeps the tiny
            CPU model's False (its activations are small; the figures compare layouts).

    Raises:
        CheckFailed: a layout lost a pair, a loss was not finite, or the two
            scorings disagree; nothing of that workload is returned.
    """
    sizes = sizes or {"demo": 400, "long_reference": 24, "ranked5": 16}
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    scorer = load_model(tiny_dir, device=device)[0] if eval_too else None
    out = {}
    for name in SHARED_PREFIX_WORKLOADS:
        records = shared_prefix_records(name, sizes[name])
        unshared, shared, report = layouts(records, tokenizer, 2 * MAX_LENGTH)
        times = {}
        for kind, rows in (("unshared", unshared), ("shared", shared)):
            model = reward_model(tiny_dir, True, use_activation_checkpointing=activation_checkpointing).to(device)
            times[kind] = _train_seconds(model, rows, device)
            del model
        figures = {f"shared_prefix_token_ratio_{name}": report.token_ratio,
                   f"shared_prefix_train_speedup_{name}": times["unshared"] / times["shared"],
                   f"shared_prefix_train_pairs_per_s_{name}": len(records) / times["shared"]}
        line = f"{name}: {report.line()}; train {times['unshared']:.1f} s -> {times['shared']:.1f} s"
        if eval_too:
            seconds, scores = {}, {}
            for kind in ("unshared", "shared", "unshared", "shared"):  # each twice, alternating; the faster counts
                t0 = time.perf_counter()
                scores[kind] = score_records(scorer, tokenizer, records, MAX_LENGTH, MAX_RESPONSE_LENGTH,
                                             shared_prefix=kind == "shared")
                seconds[kind] = min(seconds.get(kind, float("inf")), time.perf_counter() - t0)
            for kind, got in scores.items():
                check_scores([s for pair in got for s in pair], 2 * len(records), f"{name}: {kind} scoring")
            diff = max(abs(a - b) for x, y in zip(scores["shared"], scores["unshared"]) for a, b in zip(x, y))
            check(diff <= SCORE_TOLERANCE, f"{name}: shared and unshared scoring differ by {diff:.3g} "
                                           f"(tolerance {SCORE_TOLERANCE})")
            figures[f"shared_prefix_eval_speedup_{name}"] = seconds["unshared"] / seconds["shared"]
            line += f"; scoring {seconds['unshared']:.2f} s -> {seconds['shared']:.2f} s"
        print(line, file=sys.stderr)
        out.update(figures)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", help="a tiny POLAR model dir (default: one built in a temporary dir)")
    p.add_argument("--out", default=os.path.join(RESULTS, "shared_prefix.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.tiny or model_dir(os.path.join(tmp, "tiny"))
        results = run(tiny)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for k, v in results.items():
        print(f"| `{k}` | {v:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
