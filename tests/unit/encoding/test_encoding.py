"""The one encoding: parity with xtuner's training tokenization and POLAR's client."""
import json
import os

import pytest

from common import ASSETS
from polar_xtuner.demo.data import generate
from polar_xtuner.demo.tiny_model import TINY_REWARD_TOKEN_ID
from polar_xtuner.encoding import PolarEncoder, resolve_reward_token_id
from polar_xtuner.records import validate_record


def _unicode_records():
    with open(os.path.join(ASSETS, "unicode_records.jsonl"), encoding="utf-8") as f:
        return [validate_record(json.loads(line)) for line in f]


def _records():
    return list(generate(150, seed=11)) + _unicode_records()


@pytest.mark.parametrize("max_length,max_response_length", [(16384, 4096), (512, 128), (300, 60), (120, 50)])
def test_token_ids_equal_xtuner_tokenize_ref(tokenizer, max_length, max_response_length):
    from xtuner.dataset.preference_dataset import tokenize_ref

    records = _records()
    enc = PolarEncoder(tokenizer, max_length, max_response_length)
    ours = enc.encode_pairs(records)
    assert len(ours) == len(records)
    for rec, got in zip(records, ours):
        want = tokenize_ref(rec, tokenizer, max_length, max_response_length, is_reward=True,
                            reward_token_id=TINY_REWARD_TOKEN_ID)
        assert got == want, rec


def test_truncation_really_happens_in_the_parity_cases(tokenizer):
    long = _unicode_records()[4]
    enc = PolarEncoder(tokenizer, 300, 60)
    full = PolarEncoder(tokenizer, 16384, 4096)
    assert len(enc.encode_pairs([long])[0]["chosen_ids"]) <= 300
    assert len(full.encode_pairs([long])[0]["chosen_ids"]) > 300


def test_text_equals_polar_client(tiny_dir, tokenizer):
    from xtuner.utils import RewardModelClient

    client = RewardModelClient(tiny_dir, max_length=300, max_response_length=60, response_cut_side="right")
    enc = PolarEncoder(tokenizer, 300, 60, cut_side="right")
    for rec in _records():
        for cand in (rec["chosen"], rec["rejected"]):
            want = client.encode({"prompt": rec["prompt"], "reference": rec["reference"], "output": cand})
            got = enc.serving_texts([(rec["prompt"], rec["reference"], [cand])])[0]
            assert got == want


def test_left_cut_side_matches_client_default(tiny_dir, tokenizer):
    from xtuner.utils import RewardModelClient

    client = RewardModelClient(tiny_dir, max_length=400, max_response_length=40)  # cuts "left"
    enc = PolarEncoder(tokenizer, 400, 40, cut_side="left")
    rec = _unicode_records()[5]
    want = client.encode({"prompt": rec["prompt"], "reference": rec["reference"], "output": rec["chosen"]})
    assert enc.serving_texts([(rec["prompt"], rec["reference"], [rec["chosen"]])])[0] == want


def test_serving_text_tokenizes_to_training_ids(tokenizer):
    enc = PolarEncoder(tokenizer, 512, 128)
    for rec in _records()[:40]:
        text = enc.serving_texts([(rec["prompt"], rec["reference"], [rec["chosen"]])])[0]
        train_ids = enc.encode_pairs([rec])[0]["chosen_ids"]
        assert tokenizer(text)["input_ids"] == train_ids


def test_empty_part_follows_training_not_client(tokenizer):
    # POLAR's client keeps "\n" before an empty reference/output (its test
    # `len(x) == ""` is never true); training drops it, and so do we.
    enc = PolarEncoder(tokenizer, 512, 128)
    text = enc.texts([("Q?", "", ["A."])])[0][0]
    assert text == "Q?<|reward|>Q?\nA."
    text = enc.texts([("Q?", "R.", [""])])[0][0]
    assert text == "Q?\nR.<|reward|>Q?"


def test_pretrain_wrapper_has_no_newline(tokenizer):
    enc = PolarEncoder(tokenizer, 512, 128)
    assert enc.texts([("Q", "R", ["C"])], wrappers=["pretrain"])[0][0] == "QR<|reward|>QC"


def test_non_positive_prompt_budget_drops_the_prompt(tokenizer):
    # reference + candidate fill max_length - 4: budget 0 (xtuner keeps the
    # whole prompt via ids[-0:]) and below (xtuner drops its head). We drop it.
    enc = PolarEncoder(tokenizer, 24, 10)
    rec = {"prompt": "a long prompt " * 5, "reference": "r " * 30, "chosen": "c " * 30, "rejected": "x " * 30}
    text = enc.texts([(rec["prompt"], rec["reference"], [rec["chosen"]])])[0][0]
    assert "prompt" not in text
    assert text.startswith("\n")


def test_chosen_and_rejected_share_one_prompt(tokenizer):
    enc = PolarEncoder(tokenizer, 60, 30)
    prompt = " ".join(f"w{i}" for i in range(80))
    chosen, rejected = enc.texts([(prompt, "ref", ["short", "a much longer rejected answer " * 3])])[0]
    assert chosen.split("<|reward|>")[0] == rejected.split("<|reward|>")[0]


def test_labels_mark_only_the_reward_token(tokenizer):
    feat = PolarEncoder(tokenizer, 512, 128).encode_pairs(list(generate(3, 0)))[0]
    assert feat["chosen_ids"][-1] == TINY_REWARD_TOKEN_ID
    assert feat["chosen_labels"][-1] == 0 and feat["rejected_labels"][-1] == 1
    assert set(feat["chosen_labels"][:-1]) == {-100}
    assert len(feat["chosen_labels"]) == len(feat["chosen_ids"])


def test_reward_token_id_mismatch_is_refused(tokenizer):
    assert resolve_reward_token_id(tokenizer) == TINY_REWARD_TOKEN_ID
    with pytest.raises(ValueError, match="set reward_token_id = 4"):
        PolarEncoder(tokenizer, reward_token_id=92527)


def test_parity_follows_the_tokenizers_cleanup_setting(tiny_dir):
    # Real tokenizers may clean up spaces on decode by default; xtuner and
    # POLAR's client decode with the default, so the encoder must too.
    from transformers import AutoTokenizer
    from xtuner.dataset.preference_dataset import tokenize_ref

    tok = AutoTokenizer.from_pretrained(tiny_dir, clean_up_tokenization_spaces=True)
    rec = validate_record({"prompt": "Hello , world . Is it n't so ?", "reference": "Yes , it is .",
                           "chosen": "Yes , it is !", "rejected": "No ."})
    got = PolarEncoder(tok, 512, 128).encode_pairs([rec])[0]
    want = tokenize_ref(rec, tok, 512, 128, is_reward=True, reward_token_id=TINY_REWARD_TOKEN_ID)
    assert got == want
    text = PolarEncoder(tok, 512, 128).texts([(rec["prompt"], rec["reference"], [rec["chosen"]])])[0][0]
    assert text.startswith("Hello, world.")


def test_encoding_settings_file(tmp_path):
    from polar_xtuner.encoding import ENCODING_FILE, EncodingSettings

    assert EncodingSettings.from_model_dir(str(tmp_path)).source == "defaults"
    assert EncodingSettings.from_model_dir(str(tmp_path)).max_length == 16384
    EncodingSettings(2048, 256, 7).save(str(tmp_path))
    got = EncodingSettings.from_model_dir(str(tmp_path))
    assert (got.max_length, got.max_response_length, got.reward_token_id) == (2048, 256, 7)
    assert got.override(max_length=512).max_length == 512 and got.override().source == got.source
    for bad in ('{"max_length": "2048", "max_response_length": 256}', '{"max_length": true}', "[1]", "{"):
        (tmp_path / ENCODING_FILE).write_text(bad)
        with pytest.raises(ValueError, match=ENCODING_FILE):
            EncodingSettings.from_model_dir(str(tmp_path))
