"""PolarRewardModel refuses what xtuner would silently accept."""
import os
import shutil

import pytest
import torch

from common import build_reward_model
from common import build_reward_model as build_model
from common import loss_and_grads as _loss_and_grads
from common import prompt_groups as _groups
from common import publish_varlen_args as publish
from common import shared_row_batch as _shared
from common import whole_pairs_batch as _unshared
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


@pytest.mark.parametrize("case, backend", [("plain", "sdpa"), ("plain", "dense"), ("plain", "flex"),
                                           ("margins+centering+fp32", "sdpa"), ("truncated prefixes", "sdpa"),
                                           ("split groups", "sdpa")])
def test_loss_and_gradients_equal_the_unshared_pairs(tiny_dir, tokenizer, case, backend, capsys):
    """fp32 on CPU, GQA (8 query, 4 key/value heads), several groups in one row: within 1e-5 relative."""
    options = {"margin": True, "center_rewards_coefficient": 0.01, "loss_in_fp32": True} \
        if case == "margins+centering+fp32" else {}
    model = build_model(tiny_dir, shared_prefix_attn_backend=backend, **options).train()
    assert model.llm.config.num_key_value_heads < model.llm.config.num_attention_heads
    max_length = 48 if case == "truncated prefixes" else 512
    groups = _groups(tokenizer, max_length=max_length)
    if case == "split groups":
        groups = [part for g in groups for part in g.split(max(len(g.prefix) + 40, g.tokens // 2))]
        assert len(groups) > 3
    if case == "truncated prefixes":
        assert all(len(g.sequence(0)) <= max_length for g in groups)
    shared = _shared(groups)
    saved = sum(g.unshared_tokens for g in groups) / shared["input_ids"].shape[1]
    assert saved > 1.3, saved  # the test rows do share something

    if backend == "flex" and not torch.cuda.is_available():
        # FlexAttention has no CPU backward: the loss only, and training with it is refused in one line
        with torch.no_grad():
            loss_s = model(dict(shared), mode="loss")["loss"].item()
            publish(*_unshared(groups)[1:])
            loss_u = model(dict(_unshared(groups)[0]), mode="loss")["loss"].item()
            publish(None, None)
        assert loss_s == pytest.approx(loss_u, rel=1e-5)
        with pytest.raises(SystemExit) as e:
            model(dict(shared), mode="loss")
        assert e.value.code == 2 and "cannot train on CPU" in capsys.readouterr().err
        return
    out_s, grads_s = _loss_and_grads(model, shared)
    out_u, grads_u = _loss_and_grads(model, *_unshared(groups))
    assert out_s["loss"].item() == pytest.approx(out_u["loss"].item(), rel=1e-5)
    for key in ("acc", "chosen_score_mean", "rejected_score_mean", "num_samples"):
        assert out_s[key].item() == pytest.approx(out_u[key].item(), rel=1e-5, abs=1e-6), key
    if case == "margins+centering+fp32":
        assert out_s["margin_mean"].item() == pytest.approx(out_u["margin_mean"].item())
        assert out_s["center_term"].item() == pytest.approx(out_u["center_term"].item(), rel=1e-5)
    assert grads_s.keys() == grads_u.keys() and len(grads_s) > 10
    for name, g in grads_u.items():
        scale = g.abs().max().item() or 1.0
        assert (grads_s[name] - g).abs().max().item() <= 1e-5 * scale, name


def test_sequence_parallel_and_padded_models_refuse_shared_rows(tiny_dir, tokenizer, monkeypatch, capsys):
    """Inside the training loop: one line and exit 2, as every PolarRewardModel refusal."""
    data = _shared(_groups(tokenizer)[:1])
    padded = build_model(tiny_dir, use_varlen_attn=False)
    with pytest.raises(SystemExit) as e:
        padded(dict(data), mode="loss")
    assert e.value.code == 2 and "needs use_varlen_attn = True" in capsys.readouterr().err
    model = build_model(tiny_dir)
    import polar_xtuner.train.model as m

    monkeypatch.setattr(m, "get_sequence_parallel_world_size", lambda: 2)
    with pytest.raises(SystemExit) as e:
        model(dict(data), mode="loss")
    assert e.value.code == 2 and "does not work with sequence parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a backend that does not exist: refused when the model is built
        build_model(tiny_dir, shared_prefix_attn_backend="magic")
    assert e.value.code == 2 and "shared_prefix_attn_backend must be one of" in capsys.readouterr().err
