"""Check prompt/reference/chosen/rejected data and write clean training files.

Usage:
    python tools/build_dataset.py SRC [SRC ...] -o OUT_DIR
        [--val-ratio R | --val-size N] [--seed S] [--dedupe]

SRC: .jsonl files, .json arrays, or directories of them. Writes to OUT_DIR:
  train.jsonl     the kept records, normalised (a string field becomes one message)
  val.jsonl       a deterministic held-out split (with --val-ratio/--val-size)
  rejected.jsonl  one line per rejected record: source, line, field, reason, raw
  report.json     counts kept/rejected and a histogram of reasons
Exit codes: 0 at least one record kept; 2 nothing kept, a file missing or
unreadable, or conflicting options.
"""

import argparse
import sys

from polar_xtuner.build import build
from polar_xtuner.schema import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("-o", "--out-dir", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--val-ratio", type=float, default=0.0, help="share of records for val.jsonl")
    g.add_argument("--val-size", type=int, default=0, help="number of records for val.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicate records")
    args = p.parse_args(argv)
    try:
        res = build(args.sources, args.out_dir, args.val_ratio, args.val_size, args.seed,
                    args.dedupe, progress=sys.stderr.isatty())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"kept {res.kept} record(s) ({res.kept - res.val} train, {res.val} val), "
          f"rejected {res.rejected}, duplicates removed {res.duplicates} -> {args.out_dir}")
    for reason, n in res.reasons.most_common():
        print(f"  rejected {n:>6}  {reason}")
    if res.rejected:
        print(f"  details: {args.out_dir}/rejected.jsonl")
    if res.kept == 0:
        print("error: no valid record kept", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
