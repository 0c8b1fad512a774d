"""Shared prefixes against whole sequences, on the same pairs and model, in one run (``make bench``).

Usage:
    python bench/shared_prefix.py [--tiny DIR] [--out bench/results_shared_prefix.json]

For each workload it builds both training layouts the way a config does
(:func:`polar_xtuner.data.dataset.pack_pairs` rows of pairs, and
:class:`polar_xtuner.data.groups.GroupRows` rows of groups, the same row
length), trains the tiny model over every row of each from the same weights
(forward, backward, AdamW) and scores the same records locally both ways:

* ``shared_prefix_token_ratio_*``: packed tokens, unshared over shared;
* ``shared_prefix_train_speedup_*``: training pairs/s, shared over unshared;
* ``shared_prefix_eval_speedup_*``: local scoring pairs/s, shared over unshared.

Workloads: ``demo`` (the demo's training pairs), ``long_reference`` (prompts of
about 200 tokens, references of about 800, candidates of about 400; one pair
per prompt) and ``ranked5`` (ranked records of five responses: the best is the
reference, the other four give six pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("demo", "long_reference", "ranked5")
MAX_LENGTH, MAX_RESPONSE_LENGTH = 2048, 1024


def _say(rng, vocab, tokens: int) -> str:
    # about one token per word with the tiny tokenizer's word-level vocabulary
    return " ".join(rng.choice(vocab) for _ in range(tokens))


def workload(name: str, n: int, seed: int = 0) -> list[dict]:
    """The workload's validated pair records (``n``: prompts, or pairs for ``demo``)."""
    from polar_xtuner.data.formats import from_ranked
    from polar_xtuner.records import load_records

    if name == "demo":
        return load_records(os.path.join(REPO, "data", "demo", "train.jsonl"))[:n]
    from bench import demo_vocab  # bench/bench.py, a sibling script

    rng, vocab = random.Random(seed), demo_vocab()
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: {_say(rng, vocab, 200)}"}]
        if name == "long_reference":
            out.append({"prompt": prompt, "reference": [{"role": "assistant", "content": _say(rng, vocab, 800)}],
                        "chosen": [{"role": "assistant", "content": _say(rng, vocab, 400)}],
                        "rejected": [{"role": "assistant", "content": _say(rng, vocab, 400)}]})
        elif name == "ranked5":
            responses = [{"response": _say(rng, vocab, 150), "score": float(5 - k)} for k in range(5)]
            out += list(from_ranked({"prompt": prompt[0]["content"], "responses": responses}))
        else:
            raise ValueError(f"unknown workload {name!r}")
    return out


def _layouts(records, tokenizer, row: int):
    """(unshared rows, shared rows, pairs): both as a config builds them, in record order."""
    from polar_xtuner.data.dataset import encode_columns, pack_pairs, polar_collate_fn
    from polar_xtuner.data.groups import GroupRows, group_records
    from polar_xtuner.encoding import PolarEncoder

    enc = PolarEncoder(tokenizer, MAX_LENGTH, MAX_RESPONSE_LENGTH)
    pairs = pack_pairs(encode_columns(records, enc), row, shuffle=False)
    groups, report = group_records(records, enc, row)
    shared = GroupRows(groups, row, shuffle=False)
    unshared_rows = [polar_collate_fn([pairs[i]], use_varlen_attn=True)["data"] for i in range(len(pairs))]
    shared_rows = [polar_collate_fn([shared[i]], use_varlen_attn=True)["data"] for i in range(len(shared))]
    return unshared_rows, shared_rows, report


def _train_seconds(model, rows, device: str = "cpu") -> float:
    """Seconds to train over ``rows`` (forward, backward, AdamW step), after one warm-up row."""
    from mmengine import MessageHub

    hub = MessageHub.get_instance("varlen_attn_args")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def step(data):
        data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        hub.update_info("cumulative_len_rank_0", data.pop("cumulative_len")[0].to(device))
        hub.update_info("max_seqlen_rank_0", data.pop("max_seqlen"))
        try:
            model(data, mode="loss")["loss"].backward()
        finally:
            hub.update_info("cumulative_len_rank_0", None)
            hub.update_info("max_seqlen_rank_0", None)
        opt.step()
        opt.zero_grad()

    step(rows[0])
    sync()
    t0 = time.perf_counter()
    for data in rows:
        step(data)
    sync()
    return time.perf_counter() - t0


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
    """
    from transformers import AutoTokenizer

    from polar_xtuner.scoring.local import load_model, score_records
    from polar_xtuner.train.model import PolarRewardModel

    sizes = sizes or {"demo": 400, "long_reference": 24, "ranked5": 16}
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    scorer = load_model(tiny_dir, device=device)[0] if eval_too else None
    out = {}
    for name in WORKLOADS:
        records = workload(name, sizes[name])
        unshared, shared, report = _layouts(records, tokenizer, 2 * MAX_LENGTH)
        out[f"shared_prefix_token_ratio_{name}"] = report.token_ratio
        times = {}
        for kind, rows in (("unshared", unshared), ("shared", shared)):
            torch.manual_seed(0)
            model = PolarRewardModel.from_model_dir(tiny_dir, use_varlen_attn=True,
                                                    use_activation_checkpointing=activation_checkpointing,
                                                    loss_type="ranking", penalty_type="none").to(device).train()
            times[kind] = _train_seconds(model, rows, device)
            del model
        out[f"shared_prefix_train_speedup_{name}"] = times["unshared"] / times["shared"]
        out[f"shared_prefix_train_pairs_per_s_{name}"] = len(records) / times["shared"]
        if not eval_too:
            print(f"{name}: {report.line()}; train {times['unshared']:.1f} s -> {times['shared']:.1f} s",
                  file=sys.stderr)
            continue
        score = {}
        for kind in ("unshared", "shared", "unshared", "shared"):  # each twice, alternating; the faster counts
            t0 = time.perf_counter()
            score_records(scorer, tokenizer, records, MAX_LENGTH, MAX_RESPONSE_LENGTH, share_prefix=kind == "shared")
            score[kind] = min(score.get(kind, float("inf")), time.perf_counter() - t0)
        out[f"shared_prefix_eval_speedup_{name}"] = score["unshared"] / score["shared"]
        print(f"{name}: {report.line()}; train {times['unshared']:.1f} s -> {times['shared']:.1f} s; "
              f"scoring {score['unshared']:.2f} s -> {score['shared']:.2f} s", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", help="a tiny POLAR model dir (default: one built in a temporary dir)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results_shared_prefix.json"))
    args = p.parse_args(argv)
    import tempfile

    from polar_xtuner.demo.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.tiny or make_tiny_model(os.path.join(tmp, "tiny"))
        results = run(tiny)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for k, v in results.items():
        print(f"| `{k}` | {v:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
