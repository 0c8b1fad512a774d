"""Turn POLAR records (prompt + reference) into RL prompt data for verl or OpenRLHF.

Usage:
    python tools/make_rft_data.py SRC.jsonl [SRC ...] -o OUT.parquet|OUT.jsonl [--format verl|openrlhf]
        [--data-source polar] [--ability general] [--split train]

The format follows --out's extension (a --format that contradicts it is refused):
verl (.parquet): a parquet file of rows with data_source, prompt, ability,
reward_model={"style": "polar", "ground_truth": reference messages} and
extra_info={"prompt", "ability", "split", "index"}; polar_xtuner.rft reads the
prompt from extra_info and the reference from ground_truth.
openrlhf (.jsonl): a jsonl file of {"prompt": messages, "label": JSON of {prompt, reference}},
for --data.input_key prompt --data.label_key label --data.apply_chat_template.
Records without a usable prompt or reference are listed (file:line: reason) and
left out. Exit codes: 0 written, 2 bad input (missing file, no usable record,
output path equal to an input, an extension that is not the format's).
"""

if __name__ == "__main__":  # first, run as a tool: Ctrl-C, a missing module, reproducible MKL
    from polar_xtuner.cli.entry import start_tool

    start_tool()

import sys

from polar_xtuner.cli.entry import cli, entry_point
from polar_xtuner.cli.flags import ArgumentParser, non_empty
from polar_xtuner.errors import UserError
from polar_xtuner.outputs import check_writable, refuse_overlap
from polar_xtuner.rl.prompts import FORMATS, output_format, rl_rows, write_rows

@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", metavar="SRC", type=non_empty)
    p.add_argument("-o", "--out", required=True, type=non_empty, help="output file: .parquet (verl) or .jsonl (openrlhf)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="verl or openrlhf (default: the one --out's extension names)")
    p.add_argument("--data-source", default="polar", type=non_empty, help="verl's data_source column")
    p.add_argument("--ability", default="general", type=non_empty, help="verl's ability column")
    p.add_argument("--split", default="train", type=non_empty, help="extra_info.split")
    args = p.parse_args(argv)
    args.format = output_format(args.out, args.format)
    refuse_overlap({"--out": args.out}, [("SRC", s) for s in args.sources])
    check_writable(args.out, "--out")
    rows, rejected = rl_rows(args.sources, args.format, args.data_source, args.ability, args.split)
    for line in rejected:
        print(f"skipped {line}", file=sys.stderr)
    if not rows:
        raise UserError(f"no usable record (prompt + reference) in {', '.join(args.sources)}")
    write_rows(rows, args.out, args.format)
    print(f"wrote {len(rows)} {args.format} rows to {args.out} ({len(rejected)} record(s) left out)")
    return 0


if __name__ == "__main__":
    cli(main)
