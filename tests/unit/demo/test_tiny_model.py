"""The tiny POLAR model: every real config field, loadable the way users load POLAR."""
import json
import os

import torch

from polar_xtuner.constants import REWARD_SEP, REWARD_TOKEN
from polar_xtuner.demo.tiny_model import TINY_REWARD_TOKEN_ID

REAL_CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "reward_token_id",
    "tie_word_embeddings", "bias", "rope_theta", "rope_scaling", "pretraining_tp",
    "attn_implementation", "auto_map", "architectures", "model_type",
]


def test_directory_has_real_layout(tiny_dir):
    files = set(os.listdir(tiny_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "configuration_internlm2.py", "modeling_internlm2.py"} <= files
    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    missing = [k for k in REAL_CONFIG_FIELDS if k not in cfg]
    assert not missing
    assert cfg["tie_word_embeddings"] is False and cfg["pretraining_tp"] == 1
    assert cfg["auto_map"]["AutoModel"] == "modeling_internlm2.InternLM2ForRewardModel"
    assert cfg["reward_token_id"] == TINY_REWARD_TOKEN_ID
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA like the real models


def test_loads_with_automodel_and_autotokenizer(tiny_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_dir, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(tiny_dir, trust_remote_code=True)
    assert type(model).__name__ == "InternLM2ForRewardModel"
    assert model.v_head.weight.shape == (1, model.config.hidden_size)
    assert model.v_head.weight.abs().sum() > 0  # a random head, not a zero one
    enc = tok("What is the capital of China?")
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids
    assert enc["input_ids"][0] == tok.bos_token_id == 1
    assert tok.convert_tokens_to_ids(REWARD_TOKEN) == TINY_REWARD_TOKEN_ID
    assert len(tok.tokenize(REWARD_SEP)) == 1
    # the score is read at the reward token, as the real model's forward does
    ids = torch.tensor([enc["input_ids"] + [TINY_REWARD_TOKEN_ID]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out[0].shape == (1, 1) and torch.isfinite(out[0]).all()


def test_unicode_round_trips(tokenizer):
    text = "北京 😀 ünïcödé مرحبا\ttabs\nnewlines"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_make_tiny_model_is_deterministic(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from polar_xtuner.demo.tiny_model import make_tiny_model

    other = make_tiny_model(str(tmp_path / "again"))
    a = load_file(os.path.join(tiny_dir, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
