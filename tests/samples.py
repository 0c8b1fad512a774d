"""Generated inputs the tests share: hypothesis strategies, long texts of every kind, random shared-prefix rows."""
import random

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from polar_xtuner.encoding.shared_prefix import Group, pack_groups
from polar_xtuner.records import validate_record

# Property tests run in the unit tier: a bounded number of examples, each under a deadline.
FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", ""]),
                                           "content": st.text(max_size=30)}), max_size=3)
fieldish = st.one_of(st.text(max_size=30), messages, scalars)
records = st.fixed_dictionaries({}, optional={k: fieldish for k in ("prompt", "reference", "chosen", "rejected")}
                                ).flatmap(lambda d: st.dictionaries(st.text(max_size=6), json_values, max_size=2)
                                          .map(lambda extra: {**extra, **d}))


WORDS = ("the quick brown fox jumps over a lazy dog meeting children umbrella carefully "
         "Definitely assistant description , . ! ? ( ) 42 3.14 café naïve").split()
CJK = "你好世界中文字符模型奖励参考回答问题。，！"
EMOJI = ["😀", "🎉", "👍🏽", "👩‍💻", "🇨🇳", "e\u0301", "\u00a0", "𝔘", "\u200b"]
SPECIALS = ["<s>", "</s>", "<|reward|>", "[UNUSED_TOKEN_130]"]


def random_text(kind: str, n: int, rng: random.Random) -> str:
    """About n characters of one kind of text."""
    if kind == "ascii":
        return " ".join(rng.choices(WORDS, k=n // 6)) + "\n"
    if kind == "cjk":
        return "".join(rng.choices(CJK, k=n))
    if kind == "emoji":
        return "".join(rng.choices(EMOJI + [" ", "a"], k=n // 2))
    if kind == "spaces":  # long runs of spaces inside, and at both ends
        parts = [" " * rng.randrange(20_000, 60_000)]
        while sum(map(len, parts)) < n or len(parts) == 1:
            parts += [" ".join(rng.choices(WORDS, k=50)), " " * rng.randrange(1, 30_000)]
        return "".join(parts)
    if kind == "giant_word":  # no space at all, not periodic
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyzéß0123456789_", k=n))
    if kind == "specials":  # special-token strings land near the window cuts too
        return "".join(rng.choice(SPECIALS) if rng.random() < 0.2 else rng.choice(WORDS) + " "
                       for _ in range(n // 6))
    if kind == "periodic":
        unit = rng.choice(["a", "ab", " abc", "=\n", "-=", "你"])
        return unit * (n // len(unit))
    raise ValueError(kind)


KINDS = ("ascii", "cjk", "emoji", "spaces", "giant_word", "specials", "periodic")


def long_records(seed: int, n_chars: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for _ in range(count):
        rec = {f: random_text(rng.choice(KINDS), rng.randrange(n_chars // 2, n_chars), rng)
               for f in ("prompt", "reference", "chosen", "rejected")}
        # short fields too: windowing is per field, a short one sits in the same batch
        rec[rng.choice(["reference", "chosen", "rejected"])] = random_text(rng.choice(KINDS), 200, rng)
        recs.append(validate_record(rec))
    return recs


def random_row(seed):
    """Three random shared-prefix groups and their packed row."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(3):
        prefix = torch.randint(0, 50, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        seqs = [prefix + torch.randint(50, 99, (int(torch.randint(1, 9, (1,), generator=g)),),
                                       generator=g).tolist() for _ in range(int(torch.randint(2, 5, (1,), generator=g)))]
        groups.append(Group.from_sequences(seqs, [(0, 1, 0.0)]))
    return groups, pack_groups(groups)
