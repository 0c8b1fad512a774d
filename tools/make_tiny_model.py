"""Write a tiny random POLAR reward model and its tokenizer.

Usage:
    python tools/make_tiny_model.py OUT_DIR [--seed 0] [--force]

The directory loads with AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)
and AutoTokenizer.from_pretrained(OUT_DIR): an InternLM2ForRewardModel with every
field of the real POLAR config at toy sizes, and a byte-level BPE tokenizer with
POLAR's special tokens (<|reward|>, [UNUSED_TOKEN_130]).
The directory is written whole or not at all, with the modes your umask gives.
A non-empty OUT_DIR is refused unless --force, which replaces it whole if it
holds a model directory's files only (anything else is named and kept); its
folder must exist. Exit codes: 0 written, 2 a bad flag or output.
"""

if __name__ == "__main__":  # first, run as a tool: Ctrl-C, a missing module, reproducible MKL
    from polar_xtuner.cli.entry import start_tool

    start_tool()

from polar_xtuner.cli.entry import cli, entry_point
from polar_xtuner.cli.flags import ArgumentParser, non_empty, seed
from polar_xtuner.demo.tiny_model import TINY_REWARD_TOKEN_ID, write_tiny_model


@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=non_empty)
    p.add_argument("--seed", type=seed, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUT_DIR whole when it holds a model directory's files only")
    args = p.parse_args(argv)
    write_tiny_model(args.out_dir, seed=args.seed, force=args.force)
    print(f"wrote {args.out_dir} (reward token id {TINY_REWARD_TOKEN_ID})")
    return 0


if __name__ == "__main__":
    cli(main)
