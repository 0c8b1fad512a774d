"""The row's attention layout under every recompute: checkpointing kinds, LoRA, selective, threads, refusals."""
import threading

import pytest
import torch

from common import build_reward_model
from common import loss_and_grads as _loss_and_grads
from common import prompt_groups as _groups
from common import shared_row_batch as _shared
from common import whole_pairs_batch as _unshared
from polar_xtuner.train.layout import MissingLayoutError, checkpoint_setting, install_recompute


def _attention_calls(model):
    """Per layer, how many times its attention runs (forward, plus each recompute)."""
    layers = [m for m in model.llm.modules() if type(m).__name__.startswith("InternLM2") and hasattr(m, "wqkv")]
    calls = [0] * len(layers)
    for i, m in enumerate(layers):
        m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["wqkv", "wo", "w1", "w2", "w3"])


def _assert_close(got, want):
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        assert (got[name] - g).abs().max().item() <= 1e-5 * (g.abs().max().item() or 1.0), name


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("row", ["shared", "packed"])
def test_recompute_replays_the_rows_layout(tiny_dir, tokenizer, reentrant, lora, row):
    """transformers' checkpointing, reentrant or not, PEFT-wrapped or not: the gradients of the same row without recompute."""
    kw = {"lora": _lora()} if lora else {}
    plain = build_reward_model(tiny_dir, use_activation_checkpointing=False, **kw).train()
    model = build_reward_model(tiny_dir, use_activation_checkpointing=True, **kw).train()
    if not reentrant:  # as a user's gradient_checkpointing_kwargs would set it, then our wrapper again
        model.llm.gradient_checkpointing_enable({"use_reentrant": False})
        install_recompute(model.llm, True)
    model.load_state_dict(torch.nn.Module.state_dict(plain))
    groups = _groups(tokenizer)
    data = (_shared(groups),) if row == "shared" else _unshared(groups)
    calls = _attention_calls(model)
    loss, grads = _loss_and_grads(model, *data)
    assert calls == [2, 2]  # each layer ran again in backward
    want_loss, want = _loss_and_grads(plain, *data)
    assert loss["loss"].item() == pytest.approx(want_loss["loss"].item(), rel=1e-6)
    _assert_close(grads, want)


def test_selective_recompute_of_the_first_k_layers(tiny_dir, tokenizer):
    plain = build_reward_model(tiny_dir, use_activation_checkpointing=False).train()
    model = build_reward_model(tiny_dir, use_activation_checkpointing=1).train()
    assert model.activation_checkpointing == 1
    calls = _attention_calls(model)
    data = _shared(_groups(tokenizer))
    _, grads = _loss_and_grads(model, data)
    assert calls == [2, 1]  # layer 0 recomputed, layer 1 kept its activations
    _assert_close(grads, _loss_and_grads(plain, data)[1])


def test_a_recompute_on_another_thread_replays_the_layout(tiny_dir, tokenizer):
    """CUDA's autograd runs backward on a device thread, where nothing set around the forward is visible."""
    model = build_reward_model(tiny_dir).train()
    plain = build_reward_model(tiny_dir, use_activation_checkpointing=False).train()
    data = _shared(_groups(tokenizer))
    out = model(dict(data), mode="loss")
    errors = []

    def backward():
        try:
            out["loss"].backward()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert not errors, errors
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _assert_close(grads, _loss_and_grads(plain, data)[1])


def test_a_recompute_that_lost_the_layout_raises(tiny_dir, tokenizer):
    """Checkpointing re-enabled after the model was built, without install_recompute: refused, never whole-row."""
    model = build_reward_model(tiny_dir).train()
    model.llm.gradient_checkpointing_enable()  # transformers' own checkpoint function again
    out = model(dict(_shared(_groups(tokenizer))), mode="loss")
    with pytest.raises(MissingLayoutError, match="install_recompute"):
        out["loss"].backward()


def test_a_training_row_without_bounds_is_refused(tiny_dir, tokenizer, capsys):
    """A varlen model's packed row with no cumulative_len (the hook missing from a config): one line, exit 2."""
    model = build_reward_model(tiny_dir).train()
    data, _, _ = _unshared(_groups(tokenizer))
    with pytest.raises(SystemExit) as e:
        model(dict(data), mode="loss")
    assert e.value.code == 2 and "VarlenAttnArgsToMessageHubHook" in capsys.readouterr().err


def test_the_bounds_may_travel_in_the_batch(tiny_dir, tokenizer):
    """cumulative_len and max_seqlen left in the batch (no hook) are the row's layout too."""
    model = build_reward_model(tiny_dir, use_activation_checkpointing=False).train()
    data, cu, max_seqlen = _unshared(_groups(tokenizer))
    via_hub = _loss_and_grads(model, data, cu, max_seqlen)[0]["loss"].item()
    in_batch = model(dict(data, cumulative_len=[cu], max_seqlen=max_seqlen), mode="loss")["loss"].item()
    assert in_batch == via_hub


@pytest.mark.parametrize("value, want", [(True, "full"), ("full", "full"), (False, "off"), ("off", "off"),
                                         (0, "off"), (3, 3)])
def test_checkpoint_settings(value, want):
    assert checkpoint_setting(value) == want


@pytest.mark.parametrize("value", ["partial", -1, 1.5, "2"])
def test_bad_checkpoint_settings_are_refused_in_one_line(tiny_dir, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_reward_model(tiny_dir, use_activation_checkpointing=value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "activation_checkpointing must be" in err and len(err.strip().splitlines()) == 1
