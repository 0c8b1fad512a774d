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

import os
import sys

from polar_xtuner.cli.entry import cli, entry_point
from polar_xtuner.cli.flags import ArgumentParser, non_empty
from polar_xtuner.errors import UserError
from polar_xtuner.outputs import check_writable, refuse_overlap
from polar_xtuner.rl.prompts import FORMATS, rl_rows, write_rows

# The file each format is: the extension decides, so a name never lies about its content.
EXTENSIONS = {".parquet": "verl", ".jsonl": "openrlhf"}


def output_format(out: str, requested: str | None) -> str:
    """The format --out's extension names; a --format that contradicts it is refused.

    Raises:
        UserError: An unknown extension, or a --format another than the extension's.
    """
    ext = os.path.splitext(out)[1].lower()
    named = EXTENSIONS.get(ext)
    if named is None:
        raise UserError(f"--out {out}: the extension must be .parquet (verl) or .jsonl (openrlhf), "
                        f"got {ext or 'none'}")
    if requested is not None and requested != named:
        want = next(e for e, f in EXTENSIONS.items() if f == requested)
        raise UserError(f"--format {requested} writes {want}, but --out {out} names a {ext} file; "
                        f"name the output *{want}, or drop --format")
    return named


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
