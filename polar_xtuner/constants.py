"""Names and numbers that configs, tools and tests share."""

# The string that separates the reference part from the candidate part.
REWARD_SEP = "<|reward|>"
# The token whose hidden state the value head reads; id 92527 in POLAR's
# real tokenizer (vocabulary 92544, BOS 1, EOS 2).
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
POLAR_REWARD_TOKEN_ID = 92527

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"

# The four fields of a POLAR preference record.
RECORD_FIELDS = ("prompt", "reference", "chosen", "rejected")

# Labels at the reward token: 0 for chosen, 1 for rejected, ignored elsewhere
# (xtuner's RewardModel.compute_loss reads them this way).
CHOSEN_LABEL = 0
REJECTED_LABEL = 1
IGNORE_INDEX = -100

# Tokens that the template adds around the parts: BOS, two separators and the
# reward token. xtuner's tokenize_ref reserves the same budget.
TEMPLATE_RESERVED_TOKENS = 4

# POLAR's published encoding lengths (examples/xtuner_configs): the defaults
# wherever a model directory or config does not say otherwise.
DEFAULT_MAX_LENGTH = 16384
DEFAULT_MAX_RESPONSE_LENGTH = 4096
# Sequences per forward pass when scoring locally (eval_pref, evaluate).
DEFAULT_EVAL_BATCH_SIZE = 16
# A packed training row holds 2 x max_length tokens (one pair at full length).
PACKED_ROWS_PER_MAX_LENGTH = 2


def packed_length(max_length: int, max_packed_length: int | None = None) -> int:
    """The packed row length: the one given, else 2 x max_length."""
    return max_packed_length or PACKED_ROWS_PER_MAX_LENGTH * max_length

# MKL's default CPU path gives results that depend on how the operands happen to be
# aligned in memory: the same fp32 weights scored 2.3e-3 apart in two processes on an
# AMD EPYC. Its conditional-numerical-reproducibility mode makes CPU scores
# bit-reproducible. It must be in the environment before MKL's first call, so the
# entry points set it (entry.start_tool, the configs, the Makefile, the launchers,
# the tests), never an import.
MKL_CBWR = "AUTO,STRICT"

# The score statistics eval_pref --write-stats saves in a model dir, for the RL reward's POLAR_NORMALIZE=1.
STATS_FILE = "polar_reward_stats.json"
