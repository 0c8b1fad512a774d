"""Preference accuracy of a POLAR model on prompt/reference/chosen/rejected pairs.

Usage:
    python tools/eval_pref.py --model PATH --data FILE.jsonl [--out report.json]
        [--save-scores scores.jsonl] [--batch-size N]
        [--max-length N --max-response-length N]

A pair counts as correct when the chosen answer outscores the rejected one
under the same reference. Invalid records are reported (file:line: reason) and
skipped. Exit codes: 0 done, 2 bad input (missing model or data, no valid pair).
"""

import argparse
import json
import os
import sys

from polar_xtuner.schema import DataError, iter_jsonl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF POLAR model directory")
    p.add_argument("--data", required=True, help="prompt/reference/chosen/rejected .jsonl")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--save-scores", help="write one line of scores per input record here")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-length", type=int, default=16384, help="token budget per sequence")
    p.add_argument("--max-response-length", type=int, default=4096, help="cap for reference and answers")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"error: --model {args.model}: not a model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        items = list(iter_jsonl(args.data))
    except DataError as e:
        print(f"error: --data {e}", file=sys.stderr)
        return 2
    bad = [it for it in items if it.error is not None]
    for it in bad:
        print(f"skipped {it.where}: {it.error.reason}", file=sys.stderr)
    good = [it for it in items if it.record is not None]
    if not good:
        print(f"error: --data {args.data}: no valid pair to evaluate", file=sys.stderr)
        return 2

    from polar_xtuner.evaluate import format_report, load_model, preference_report, score_records

    model, tokenizer = load_model(args.model)
    records = [it.record for it in good]
    scores = score_records(model, tokenizer, records, args.max_length, args.max_response_length,
                           args.batch_size, progress=True)
    report = preference_report(scores, records)
    report["skipped"] = len(bad)
    report["model"] = args.model
    report["data"] = args.data
    print(format_report(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.save_scores:
        by_line = {it.line: s for it, s in zip(good, scores)}
        with open(args.save_scores, "w") as f:
            for it in items:
                s = by_line.get(it.line) if it.record is not None else None
                row = {"line": it.line, "chosen": s[0] if s else None, "rejected": s[1] if s else None}
                if s is None:
                    row["error"] = it.error.reason
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
