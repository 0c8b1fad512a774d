"""Check prompt/reference/chosen/rejected data and write clean training files.

Usage:
    python tools/build_dataset.py SRC [SRC ...] -o OUT_DIR
        [--from polar|ranked|policies|pairwise [--pairs-per-prompt K]]
        [--val-ratio R | --val-size N] [--seed S] [--dedupe]
        [--tokenizer PATH [--max-length N] [--max-response-length N]
         [--max-packed-length N] [--drop-overlong]]

SRC: .jsonl files, .json arrays, or directories of them. Writes to OUT_DIR:
  train.jsonl     the kept records, normalised (a string field becomes one message)
  val.jsonl       a deterministic held-out split (with --val-ratio/--val-size)
  rejected.jsonl  one line per rejected record: source, line, field, reason, raw
  report.json     counts kept/rejected and a histogram of reasons; with
                  --tokenizer, token lengths per field and how many records
                  will be truncated or exceed max_packed_length; with
                  --from policies, triples per prompt and per policy
--from policies turns {"prompt", "samples": [{"policy", "response"}, ...]}
records into policy-discrimination triples (reference and chosen from one
policy, rejected from another), at most K per prompt, drawn with --seed.
Exit codes: 0 at least one record kept; 2 nothing kept, a file missing or
unreadable, or conflicting options.
"""

if __name__ == "__main__":  # first, run as a tool: Ctrl-C, a missing module, reproducible MKL
    from polar_xtuner.cli.entry import start_tool

    start_tool()

import sys

from polar_xtuner.cli.entry import cli, entry_point
from polar_xtuner.cli.flags import ArgumentParser, float_in, int_at_least, non_empty, seed
from polar_xtuner.constants import DEFAULT_MAX_LENGTH, DEFAULT_MAX_RESPONSE_LENGTH, TEMPLATE_RESERVED_TOKENS
from polar_xtuner.data.check import build, length_meter
from polar_xtuner.data.formats import DEFAULT_PAIRS_PER_PROMPT, FORMATS
from polar_xtuner.errors import UserError
from polar_xtuner.hf_layout import TRUST_FLAG
from polar_xtuner.outputs import check_writable_dir, refuse_overlap


@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", metavar="SRC", type=non_empty)
    p.add_argument("-o", "--out-dir", required=True, type=non_empty)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--val-ratio", type=float_in(0, 1, high_open=True), default=0.0, help="share of records for val.jsonl")
    g.add_argument("--val-size", type=int_at_least(0), default=0, help="number of records for val.jsonl")
    p.add_argument("--seed", type=seed, default=0, help="seed of the val split (and of --from policies' triples)")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicate records")
    p.add_argument("--from", dest="fmt", choices=FORMATS, default="polar",
                   help="input format: POLAR records (default), ranked responses (best = reference), "
                        "policies (samples of several policies -> policy-discrimination triples), "
                        "or pairwise without reference (refused, with what is needed)")
    p.add_argument("--pairs-per-prompt", type=int_at_least(1), default=None, metavar="K",
                   help=f"--from policies: most triples per prompt (default {DEFAULT_PAIRS_PER_PROMPT})")
    p.add_argument("--tokenizer", type=non_empty, help="tokenizer (model dir) for token-length statistics")
    p.add_argument("--max-length", type=int_at_least(TEMPLATE_RESERVED_TOKENS + 1), default=DEFAULT_MAX_LENGTH, help="as in the training config")
    p.add_argument("--max-response-length", type=int_at_least(1), default=DEFAULT_MAX_RESPONSE_LENGTH,
                   help="as in the training config")
    p.add_argument("--max-packed-length", type=int_at_least(TEMPLATE_RESERVED_TOKENS + 1), default=None, help="default: 2 x --max-length")
    p.add_argument("--drop-overlong", action="store_true",
                   help="reject records that would be truncated or exceed max_packed_length (default: count them)")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="run Python code in --tokenizer's directory even when it is not the code this project ships")
    args = p.parse_args(argv)
    if args.drop_overlong and not args.tokenizer:
        p.error("--drop-overlong needs --tokenizer")
    if args.pairs_per_prompt is not None and args.fmt != "policies":
        p.error("--pairs-per-prompt applies to --from policies only")
    if args.pairs_per_prompt is not None and args.pairs_per_prompt < 1:
        p.error(f"--pairs-per-prompt must be at least 1, got {args.pairs_per_prompt}")
    # cheap checks first: the tokenizer can take a while to load
    refuse_overlap({"-o": args.out_dir}, [("SRC", src) for src in args.sources])
    check_writable_dir(args.out_dir, "-o")
    meter = length_meter(args.tokenizer, args.max_length, args.max_response_length, args.max_packed_length,
                         args.trust_remote_code) if args.tokenizer else None
    res = build(args.sources, args.out_dir, args.val_ratio, args.val_size, args.seed,
                args.dedupe, progress=sys.stderr.isatty(), meter=meter, drop_overlong=args.drop_overlong,
                fmt=args.fmt, pairs_per_prompt=args.pairs_per_prompt)
    print("\n".join(res.summary(args.out_dir)))
    if res.kept == 0:
        raise UserError(f"no valid record kept from {', '.join(args.sources)}; "
                        f"see {args.out_dir}/rejected.jsonl for why each was rejected")
    return 0


if __name__ == "__main__":
    cli(main)
