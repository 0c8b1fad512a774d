"""Every shipped config, built as shipped, trains on the gradients of its own pairs.

For each file in configs/ (a new one is picked up by the glob), the model, the
dataset and the collate function are built from a copy of the config in which
only the model path (the tiny model, with its reward token id), the data file
and the data cache folder are swapped. One train-mode step runs through
xtuner's own ``VarlenAttnArgsToMessageHubHook``, mmengine's data preprocessor
and ``parse_losses`` (bench/recipe_gradients.py), with every other setting as
shipped: shared prefixes, activation checkpointing, LoRA. Its loss and every
gradient must equal those of the same pairs trained whole
(``shared_prefix = False``) without recompute (``activation_checkpointing =
False``), from the same weights, in fp32 on CPU, within 1e-5 relative.

The step is also checked to be the one the config describes: the row is a
shared-prefix row where the config shares prefixes, and each layer's attention
runs twice per step (forward and recompute) where it checkpoints.
"""
import glob
import os

import pytest
import torch

from bench.recipe_gradients import build, compare, train_step
from common import REPO, prompt_sharing_records
from polar_xtuner.demo.tiny_model import TINY_REWARD_TOKEN_ID

SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
TOLERANCE = 1e-5


def _records():
    return prompt_sharing_records(margins=False)


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    from polar_xtuner.demo.data import write_jsonl

    path = str(tmp_path_factory.mktemp("exact") / "pairs.jsonl")
    write_jsonl(path, _records())
    return path


def cannot_run_here(cfg) -> str | None:
    """Why a config cannot take this fp32 single-process step, or None."""
    if cfg.model.llm.get("quantization_config") is not None:
        return ("QLoRA loads the base in 4 bits with bitsandbytes, whose kernels need CUDA and compute in bf16, "
                "not fp32: scripts/gpu_check.sh's recipe_gradients step checks this config as shipped on the GPU, "
                "in bf16")
    if cfg.get("sequence_parallel_size", 1) > 1:
        return ("sequence parallel splits each row over several ranks, and xtuner 0.2.0 gathers the scores with "
                "a collective that refuses CPU tensors; tests/integration/train/test_attention.py checks its "
                "attention and gradients under activation checkpointing on two CPU ranks")
    return None


def _build(path, tmp_path, tiny_dir, data_file, tag, **settings):
    from mmengine.config import Config

    reason = cannot_run_here(Config.fromfile(path))
    if reason:
        pytest.skip(reason)
    # the reward token's id belongs to the model's tokenizer: the tiny one's with the tiny model
    return build(path, str(tmp_path / tag), pretrained_model_name_or_path=tiny_dir, data_files=data_file,
                 data_cache_dir=str(tmp_path / tag / "cache"), reward_token_id=TINY_REWARD_TOKEN_ID, **settings)


def _one_row(dataset, collate):
    # both layouts must hold the same pairs: the test's records fit one row of either
    assert len(dataset) == 1
    return collate([dataset[0]])


def _assert_same(got, want):
    err = compare(got, want)
    assert err["loss"] <= TOLERANCE, err["loss"]
    assert got["losses"]["num_samples"].item() == want["losses"]["num_samples"].item() == len(_records())
    assert not err["missing"] and len(err["grads"]) > 10
    bad = sorted(((e, n) for n, e in err["grads"].items() if not e <= TOLERANCE), reverse=True)
    assert not bad, f"gradients off by more than {TOLERANCE} relative: {bad[:5]}"


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_config_as_shipped_trains_on_its_pairs_gradients(path, tiny_dir, records_file, tmp_path):
    from mmengine.config import Config

    dropout = Config.fromfile(path).get("lora_dropout", 0.0)
    # Dropout draws differ between two layouts of the same tokens, so with LoRA
    # dropout on, the shared and whole steps cannot be compared exactly: both run
    # with lora_dropout = 0 here, and the shipped dropout is compared against the
    # same layout without recompute below (the recompute must redraw the same masks).
    swap = {"lora_dropout": 0.0} if dropout else {}
    model, dataset, collate, cfg = _build(path, tmp_path, tiny_dir, records_file, "shipped", **swap)
    batch = _one_row(dataset, collate)
    got = train_step(model, batch)

    # the step is the one the config describes
    assert (batch["data"].get("shared_prefix") is not None) == bool(cfg.shared_prefix)
    recompute = cfg.model.use_activation_checkpointing  # the PART 1 setting (its top-level name is dropped)
    want_calls = [2 if recompute is True or (recompute and i < recompute) else 1
                  for i in range(len(got["attention_calls"]))]
    assert got["attention_calls"] == want_calls, f"activation_checkpointing={recompute!r}"

    ref, ref_dataset, ref_collate, _ = _build(path, tmp_path, tiny_dir, records_file, "reference",
                                              shared_prefix=False, activation_checkpointing=False, **swap)
    ref_batch = _one_row(ref_dataset, ref_collate)
    assert ref_batch["data"].get("shared_prefix") is None
    ref.load_state_dict(torch.nn.Module.state_dict(model))  # the same weights, LoRA adapters and head included
    want = train_step(ref, ref_batch)
    assert set(want["attention_calls"]) == {1}
    _assert_same(got, want)

    if dropout:
        model, dataset, collate, _ = _build(path, tmp_path, tiny_dir, records_file, "dropout")
        batch = _one_row(dataset, collate)
        got = train_step(model, batch, seed=1)
        plain, _, _, _ = _build(path, tmp_path, tiny_dir, records_file, "dropout_plain",
                                activation_checkpointing=False)
        plain.load_state_dict(torch.nn.Module.state_dict(model))
        _assert_same(got, train_step(plain, batch, seed=1))
