"""Local scoring with shared prefixes (polar_xtuner/scoring/local.py): each score equals the unshared one."""
import os

import pytest
import torch

from common import REPO
from polar_xtuner.demo.data import generate
from polar_xtuner.records import load_records
from polar_xtuner.scoring.local import pad_id, score_groups, score_ids, score_records


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


def test_left_and_right_padding_give_equal_scores(tiny_model, tokenizer):
    recs = list(generate(12, 3))
    left = score_records(tiny_model, tokenizer, recs, 512, 128, batch_size=8, padding_side="left")
    right = score_records(tiny_model, tokenizer, recs, 512, 128, batch_size=8, padding_side="right")
    single = score_records(tiny_model, tokenizer, recs, 512, 128, batch_size=1)
    flat = lambda s: torch.tensor(s).flatten()  # noqa: E731
    assert torch.allclose(flat(left), flat(right), atol=1e-5)
    assert torch.allclose(flat(left), flat(single), atol=1e-5)


def test_scores_match_the_hf_forward(tiny_model, tokenizer):
    from polar_xtuner.encoding import PolarEncoder

    rec = list(generate(1, 5))
    ids = PolarEncoder(tokenizer, 512, 128).encode_pairs(rec)[0]["chosen_ids"]
    ours = score_ids(tiny_model, [ids], tokenizer.pad_token_id)[0]
    with torch.no_grad():
        t = torch.tensor([ids])
        hf = tiny_model(input_ids=t, attention_mask=torch.ones_like(t))[0].item()
    assert ours == pytest.approx(hf, abs=1e-5)


def test_an_empty_answer_is_one_whether_a_string_or_messages(tiny_model, tokenizer):
    from polar_xtuner.records import validate_group_record

    base = {"prompt": "q", "reference": "r"}
    as_text = validate_group_record({**base, "responses": [{"response": "", "correct": False},
                                                           {"response": "r", "correct": True}]})
    as_messages = validate_group_record({**base, "responses": [
        {"response": [{"role": "assistant", "content": ""}], "correct": False}, {"response": "r", "correct": True}]})
    assert as_text["responses"] == as_messages["responses"]
