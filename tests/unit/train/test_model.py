"""PolarRewardModel refuses what xtuner would silently accept."""
import os
import shutil

import pytest
import torch

from common import build_reward_model
from polar_xtuner.demo.data import generate
from polar_xtuner.encoding import PolarEncoder


def test_non_finite_loss_stops_training(tiny_dir, tokenizer):
    from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn

    model = build_reward_model(tiny_dir, use_varlen_attn=False).train()
    with torch.no_grad():
        model.v_head.weight.fill_(float("nan"))
    feats = PolarEncoder(tokenizer, 512, 128).encode_pairs(list(generate(2, 0)))
    data = preference_collate_fn(feats, use_varlen_attn=False)["data"]
    with pytest.raises(FloatingPointError, match="non-finite reward loss.*bf16"):
        model(dict(data), mode="loss")


def test_value_head_missing_from_checkpoint_is_refused(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = str(tmp_path / "no_head")
    shutil.copytree(tiny_dir, broken)
    weights = load_file(os.path.join(broken, "model.safetensors"))
    del weights["v_head.weight"]
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        build_reward_model(broken, use_varlen_attn=False)
    assert e.value.code == 2
    assert "weights missing from the checkpoint: v_head.weight" in capsys.readouterr().err


def test_value_head_is_the_checkpoints(tiny_dir):
    from safetensors.torch import load_file

    model = build_reward_model(tiny_dir, use_varlen_attn=False)
    saved = load_file(os.path.join(tiny_dir, "model.safetensors"))["v_head.weight"]
    assert torch.equal(model.v_head.weight.detach(), saved)


def test_cpu_build_picks_sdpa_and_float32(tiny_dir):
    model = build_reward_model(tiny_dir, use_varlen_attn=False)
    assert model.llm.dtype == torch.float32
    assert type(model.llm.layers[0].attention).__name__ == "InternLM2SdpaAttention"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_training_step_with_each_cpu_attention(tiny_dir, tokenizer, impl):
    from mmengine.config import ConfigDict
    from transformers import AutoModel
    from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn

    from polar_xtuner.train.model import PolarRewardModel

    model = PolarRewardModel(
        llm=ConfigDict(type=AutoModel.from_pretrained, pretrained_model_name_or_path=tiny_dir,
                       trust_remote_code=True, attn_implementation=impl),
        loss_type="ranking", penalty_type="none",  # activation checkpointing on, as the GPU configs ship
    ).train()
    assert model.llm.config.attn_implementation == impl
    feats = PolarEncoder(tokenizer, 512, 128).encode_pairs(list(generate(3, 1)))
    out = model(dict(preference_collate_fn(feats, use_varlen_attn=False)["data"]), mode="loss")
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.v_head.weight.grad is not None


def test_flash_attention_2_without_flash_attn_is_refused(tiny_dir, capsys):
    from mmengine.config import ConfigDict
    from transformers import AutoModel

    from polar_xtuner.train.model import PolarRewardModel, flash_attn_available

    if flash_attn_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(SystemExit):
        PolarRewardModel(llm=ConfigDict(type=AutoModel.from_pretrained, pretrained_model_name_or_path=tiny_dir,
                                        trust_remote_code=True, attn_implementation="flash_attention_2"))
    assert "install flash-attn" in capsys.readouterr().err
