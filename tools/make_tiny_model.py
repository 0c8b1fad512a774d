"""Write a tiny random POLAR reward model and its tokenizer.

Usage:
    python tools/make_tiny_model.py OUT_DIR [--seed 0]

The directory loads with AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)
and AutoTokenizer.from_pretrained(OUT_DIR): an InternLM2ForRewardModel with every
field of the real POLAR config at toy sizes, and a byte-level BPE tokenizer with
POLAR's special tokens (<|reward|>, [UNUSED_TOKEN_130]).
"""

from polar_xtuner.errors import cli, entry_point
from polar_xtuner.flags import ArgumentParser, int_at_least, non_empty
from polar_xtuner.tiny import TINY_REWARD_TOKEN_ID, make_tiny_model


@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=non_empty)
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    make_tiny_model(args.out_dir, seed=args.seed)
    print(f"wrote {args.out_dir} (reward token id {TINY_REWARD_TOKEN_ID})")
    return 0


if __name__ == "__main__":
    cli(main)
