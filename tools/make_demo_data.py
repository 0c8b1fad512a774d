"""Regenerate the demo data (data/demo/train.jsonl and val.jsonl).

Usage:
    python tools/make_demo_data.py [OUT_DIR] [--train N] [--val N] [--seed S]

Records ask which color/city/animal a text names, in English and Chinese; the
chosen answer agrees with the reference's final answer, the rejected one does
not. Answers are random per record, so only the reference tells them apart.
"""

if __name__ == "__main__":  # first, run as a tool: Ctrl-C, a missing module, reproducible MKL
    from polar_xtuner.cli.entry import start_tool

    start_tool()

from polar_xtuner.cli.entry import cli, entry_point
from polar_xtuner.cli.flags import ArgumentParser, int_at_least, non_empty, seed
from polar_xtuner.demo.data import write_demo_data


@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default="data/demo", type=non_empty)
    p.add_argument("--train", type=int_at_least(1), default=8000, help="training pairs")
    p.add_argument("--val", type=int_at_least(0), default=200, help="held-out pairs")
    p.add_argument("--seed", type=seed, default=0)
    args = p.parse_args(argv)
    counts = write_demo_data(args.out_dir, args.train, args.val, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val pairs to {args.out_dir}")
    return 0


if __name__ == "__main__":
    cli(main)
