"""LoRA checkpoints: adapters plus the trained value head, merged or kept as a PEFT adapter.

A LoRA run of ``PolarRewardModel`` saves the adapters of its backbone
(``llm.base_model.model.<module>.lora_A/B[.default].weight``) and the value
head (``v_head.weight``); DeepSpeed checkpoints hold the same trainable
tensors. The base weights come from the config's model. Two outputs:

* merged: the base model with the adapters folded into its weights and the
  trained head, a plain ``InternLM2ForRewardModel`` directory;
* adapter: a PEFT directory over the whole reward model, with the head as a
  ``modules_to_save`` module, loadable with
  ``PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), dir)``.

A checkpoint without the head, or with the base model's head unchanged, is
refused: exporting it would silently ship an untrained head (xtuner's own
RewardModel dropped it from LoRA checkpoints).
"""

from __future__ import annotations

import os

import torch

from polar_xtuner.errors import UserError
from polar_xtuner.hf_layout import check_files_whole, load_failure, text_only_transformers
from polar_xtuner.precision import SCORING_ATTENTION

ADAPTER_CONFIG = "adapter_config.json"


class LoraCheckpointError(UserError):
    """The LoRA checkpoint cannot give a trained model (the message says why)."""


def is_lora_state_dict(state_dict: dict) -> bool:
    """The checkpoint holds LoRA adapters."""
    return any(".lora_A." in k or ".lora_B." in k for k in state_dict)


def split_lora_state_dict(state_dict: dict) -> tuple[dict, torch.Tensor | None]:
    """The adapters, keyed as PEFT's saved state dict of the backbone, and the head.

    Frozen base weights a DeepSpeed checkpoint may also hold are left out:
    the base model comes from the config.
    """
    adapters, head = {}, None
    for key, value in state_dict.items():
        if key == "v_head.weight":
            head = value
        elif ".lora_A." in key or ".lora_B." in key:
            key = key[len("llm."):] if key.startswith("llm.") else key
            adapters[key.replace(".default.", ".")] = value
    return adapters, head


def lora_config(cfg, backbone, modules_to_save=None):
    """The config's ``model.lora`` as a ``peft.LoraConfig``, target modules resolved as xtuner does."""
    from xtuner.model.utils import find_all_linear_names
    from xtuner.registry import BUILDER

    spec = cfg.model.get("lora")
    if spec is None:
        raise LoraCheckpointError("the checkpoint holds LoRA adapters but the config has no model.lora: "
                                  "convert with the config the run was trained with")
    config = BUILDER.build(spec) if isinstance(spec, dict) else spec
    if config.target_modules is None:
        config.target_modules = find_all_linear_names(backbone)
    if modules_to_save:
        config.modules_to_save = list(modules_to_save)
    return config


def check_head(head: torch.Tensor | None, base_head: torch.Tensor) -> None:
    """The head was saved and trained.

    Raises:
        LoraCheckpointError: Missing, mis-shaped or equal to the base model's.
    """
    if head is None:
        raise LoraCheckpointError(
            "the LoRA checkpoint has no v_head.weight: the trained value head was not saved (xtuner's "
            "RewardModel keeps only the adapters); train with polar_xtuner.train.model.PolarRewardModel")
    if tuple(head.shape) != tuple(base_head.shape):
        raise LoraCheckpointError(f"v_head.weight has shape {tuple(head.shape)}, the model's is "
                                  f"{tuple(base_head.shape)} (wrong config?)")
    if torch.equal(head.float(), base_head.float()):
        raise LoraCheckpointError("the LoRA checkpoint's v_head equals the base model's: the head was never "
                                  "trained (frozen?), so the export would score like the base model")


def _load_adapters(peft_model, adapters: dict, prefix: str = "") -> None:
    from peft import set_peft_model_state_dict

    wanted = {prefix + k: v for k, v in adapters.items()}
    result = set_peft_model_state_dict(peft_model, wanted)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"adapters missing from the checkpoint: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"adapters the config's LoRA does not have: {', '.join(unexpected[:5])}")
        raise LoraCheckpointError("the checkpoint does not match the config's LoRA (wrong config?): "
                                  + "; ".join(parts))


def load_base(model_dir: str, dtype=torch.float32):
    """The config's base reward model, with its weights (the adapters apply on top).

    Raises:
        UserError: A weight file of a local base model is truncated (named),
            or the weights do not load.
    """
    text_only_transformers()
    from transformers import AutoModel

    flag = "the config's model"
    if os.path.isdir(model_dir):
        check_files_whole(model_dir, flag, "copy or download the base model again")
    try:
        return AutoModel.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=dtype,
                                         attn_implementation=SCORING_ATTENTION).eval()
    except OSError:
        raise  # a missing file or hub name: the converter says which model
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
        if isinstance(e, MemoryError):
            raise
        raise load_failure(model_dir, "model", e, flag) from None


def adapted_model(cfg, model_dir: str, state_dict: dict):
    """The base reward model with the trained adapters (not merged yet) and head.

    Returns:
        (model, peft_backbone, adapters, head): ``model.model`` is the PEFT
        backbone; ``merge(model, peft_backbone)`` folds the adapters in.
    """
    adapters, head = split_lora_state_dict(state_dict)
    model = load_base(model_dir)
    check_head(head, model.v_head.weight.detach())
    from peft import get_peft_model

    peft_backbone = get_peft_model(model.model, lora_config(cfg, model.model))
    _load_adapters(peft_backbone, adapters)
    model.model = peft_backbone
    with torch.no_grad():
        model.v_head.weight.copy_(head.to(model.v_head.weight.dtype))
    return model.eval(), peft_backbone, adapters, head


def merge(model, peft_backbone) -> None:
    """Fold the adapters into the backbone's weights, in place."""
    model.model = peft_backbone.merge_and_unload()


def save_adapter(cfg, model_dir: str, adapters: dict, head: torch.Tensor, out_dir: str) -> None:
    """Write the adapters and the head as a PEFT directory over the whole reward model."""
    from peft import get_peft_model

    base = load_base(model_dir)
    peft_model = get_peft_model(base, lora_config(cfg, base.model, modules_to_save=["v_head"]))
    # The backbone is `model` inside the reward model: its adapters gain that prefix.
    backbone = {("base_model.model.model." + k[len("base_model.model."):]
                 if k.startswith("base_model.model.") else k): v for k, v in adapters.items()}
    _load_adapters(peft_model, {**backbone, "base_model.model.v_head.weight": head})
    wrapped = peft_model.base_model.model.v_head
    trained = wrapped.modules_to_save[peft_model.active_adapter].weight
    if not torch.equal(trained.detach(), head.to(trained.dtype)):
        raise AssertionError("the head did not reach the adapter's modules_to_save")
    peft_model.save_pretrained(out_dir)
