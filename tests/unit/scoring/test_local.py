"""Local scoring with shared prefixes (polar_xtuner/scoring/local.py): each score equals the unshared one."""
import os

import pytest

from common import REPO
from polar_xtuner.records import load_records
from polar_xtuner.scoring.local import pad_id, score_groups, score_records

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def _records():
    """The val pairs, plus pairs that share prompts and references (answers from other records)."""
    recs = load_records(VAL)[:60]
    extra = [{**recs[i], "chosen": recs[i + 20]["chosen"], "rejected": recs[i + 21]["rejected"]} for i in range(10)]
    return recs + extra + [{**recs[0], "rejected": recs[0]["chosen"]}]


@pytest.mark.parametrize("max_length", [1024, 48], ids=["whole", "truncated prompts"])
def test_shared_prefix_scores_equal_the_unshared_ones(tiny_model, tokenizer, max_length):
    records = _records()
    plain = score_records(tiny_model, tokenizer, records, max_length, 128)
    shared = score_records(tiny_model, tokenizer, records, max_length, 128, shared_prefix=True)
    assert len(shared) == len(plain) == len(records)
    worst = max(abs(a - b) / max(1.0, abs(b)) for p, s in zip(plain, shared) for a, b in zip(s, p))
    assert worst <= 1e-5, worst
    assert shared[-1][0] == pytest.approx(shared[-1][1], abs=1e-5)  # equal answers, equal scores


def test_small_batches_and_rows_give_the_same_scores(tiny_model, tokenizer):
    from polar_xtuner.encoding import PolarEncoder
    from polar_xtuner.encoding.shared_prefix import group_pairs

    groups, _ = group_pairs(_records(), PolarEncoder(tokenizer, 1024, 128))
    big = score_groups(tiny_model, groups, pad_id(tokenizer), 4096, batch_size=16)
    small = score_groups(tiny_model, groups, pad_id(tokenizer), 1, batch_size=1)  # a row per group
    assert [len(s) for s in big] == [len(g.candidates) for g in groups]
    assert max(abs(a - b) for x, y in zip(big, small) for a, b in zip(x, y)) <= 1e-5
