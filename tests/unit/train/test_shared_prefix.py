"""Shared-prefix training rows: the loss and every gradient equal the unshared computation of the same pairs."""
import pytest
import torch

from common import build_reward_model as build_model
from common import loss_and_grads as _loss_and_grads
from common import prompt_groups as _groups
from common import publish_varlen_args as publish
from common import shared_row_batch as _shared
from common import whole_pairs_batch as _unshared


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
