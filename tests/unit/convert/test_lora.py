"""LoRA checkpoints in-process: the adapters and the trained head are told apart from the base weights."""
import torch

from polar_xtuner.convert.lora import is_lora_state_dict, split_lora_state_dict


def test_adapters_are_keyed_as_peft_saves_them_and_the_head_is_kept():
    a, b, head, base = torch.ones(2, 4), torch.zeros(4, 2), torch.full((1, 4), 3.0), torch.eye(4)
    state = {
        "llm.base_model.model.model.layers.0.attention.wqkv.lora_A.default.weight": a,
        "llm.base_model.model.model.layers.0.attention.wqkv.lora_B.default.weight": b,
        "llm.base_model.model.model.layers.0.attention.wqkv.base_layer.weight": base,  # frozen: from the config
        "v_head.weight": head,
    }
    assert is_lora_state_dict(state)
    adapters, got_head = split_lora_state_dict(state)
    assert set(adapters) == {"base_model.model.model.layers.0.attention.wqkv.lora_A.weight",
                             "base_model.model.model.layers.0.attention.wqkv.lora_B.weight"}
    assert got_head is head and adapters["base_model.model.model.layers.0.attention.wqkv.lora_A.weight"] is a


def test_a_full_checkpoint_is_not_lora():
    state = {"llm.model.layers.0.attention.wqkv.weight": torch.eye(2), "v_head.weight": torch.ones(1, 2)}
    assert not is_lora_state_dict(state)
    assert split_lora_state_dict(state) == ({}, state["v_head.weight"])
