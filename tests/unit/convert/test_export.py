"""Every refusal of the converter, in process, on a small saved state dict (no training).

The checkpoint is the tiny model's own weights saved as training saves them
(``{"state_dict": ...}`` under PolarRewardModel's keys: ``llm.*`` for the HF
``model.*``, ``v_head.*`` as is), so each case differs from a convertible
checkpoint by exactly the fault it names; ``test_the_good_checkpoint_converts``
is the control. Each fault must raise a typed ConvertError or CheckpointError (UserErrors,
exit 2) and make ``main`` return 2 with one ``error:`` line naming the file or
the keys, writing nothing.
"""
import os

import pytest
import torch

from common import VAL, copy_config
from polar_xtuner.train.checkpoint import CheckpointError
from polar_xtuner.convert.export import ConvertError, ConvertSettings, convert, main
from polar_xtuner.errors import UserError


def _save_checkpoint(path, state):
    torch.save({"state_dict": state, "meta": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def good(tiny_dir, tmp_path_factory):
    """A .pth under training's keys, its config, and the state dict (to derive broken ones from)."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("convert_refusals")
    hf = load_file(os.path.join(tiny_dir, "model.safetensors"))
    state = {("llm." + k[len("model."):] if k.startswith("model.") else k): v for k, v in hf.items()}
    assert "v_head.weight" in state and any(k.startswith("llm.layers.0.") for k in state)
    return {
        "tmp": tmp,
        "state": state,
        "ckpt": _save_checkpoint(tmp / "iter_1.pth", state),
        "cfg": copy_config(str(tmp), "polar_convert_refusals.py", tiny_dir, VAL),
    }


def _case_missing_checkpoint(good, tmp):
    path = str(tmp / "missing.pth")
    return good["cfg"], path, [f"checkpoint {path}: no such file or directory"]


def _case_empty_dir(good, tmp):
    (tmp / "empty").mkdir()
    path = str(tmp / "empty")
    return good["cfg"], path, [f"checkpoint {path}: empty directory"]


def _case_empty_file(good, tmp):
    (tmp / "zero.pth").write_bytes(b"")
    path = str(tmp / "zero.pth")
    return good["cfg"], path, [f"checkpoint {path}: empty file"]


def _case_neither_deepspeed_nor_work_dir(good, tmp):
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("not a checkpoint")
    path = str(tmp / "other")
    return good["cfg"], path, [f"checkpoint {path}: neither a DeepSpeed checkpoint", "nor a work dir"]


def _case_missing_config(good, tmp):
    path = str(tmp / "nope.py")
    return path, good["ckpt"], [f"config {path}: no such file"]


def _case_work_dir_names_a_missing_file(good, tmp):
    work = tmp / "work"
    work.mkdir()
    gone = str(work / "iter_9.pth")
    (work / "last_checkpoint").write_text(gone)
    return good["cfg"], str(work), [f"{work / 'last_checkpoint'} names {gone}, which does not exist"]


def _case_truncated_pth(good, tmp):
    data = open(good["ckpt"], "rb").read()
    path = tmp / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    return good["cfg"], str(path), [f"checkpoint {path}: not a PyTorch checkpoint, or truncated"]


def _case_not_a_state_dict(good, tmp):
    path = tmp / "list.pth"
    torch.save([1, 2, 3], path)
    return good["cfg"], str(path), [f"checkpoint {path}: holds no state dict"]


def _case_missing_key(good, tmp):
    state = {k: v for k, v in good["state"].items() if k != "llm.norm.weight"}
    path = _save_checkpoint(tmp / "no_norm.pth", state)
    return good["cfg"], path, ["does not match the config's model", "missing keys: model.norm.weight"]


def _case_unexpected_key(good, tmp):
    state = dict(good["state"], **{"llm.extra.weight": torch.zeros(2)})
    path = _save_checkpoint(tmp / "extra.pth", state)
    return good["cfg"], path, ["does not match the config's model", "unexpected keys: model.extra.weight"]


def _case_mis_shaped_key(good, tmp):
    from polar_xtuner.demo.tiny_model import make_tiny_model

    wider = make_tiny_model(str(tmp / "wider"), hidden_size=96, intermediate_size=192)
    cfg = copy_config(str(tmp), "polar_convert_wider.py", wider, VAL)
    return cfg, good["ckpt"], ["does not match the config's model",
                               "mis-shaped: model.layers.0.attention.wo.weight: checkpoint"]


CASES = [
    _case_missing_checkpoint,
    _case_empty_dir,
    _case_empty_file,
    _case_neither_deepspeed_nor_work_dir,
    _case_missing_config,
    _case_work_dir_names_a_missing_file,
    _case_truncated_pth,
    _case_not_a_state_dict,
    _case_missing_key,
    _case_unexpected_key,
    _case_mis_shaped_key,
]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__[len("_case_"):])
def test_refusal_is_a_typed_error_and_exit_2_naming_the_fault(case, good, tmp_path, capsys):
    cfg, ckpt, messages = case(good, tmp_path)
    out = tmp_path / "hf"

    with pytest.raises((ConvertError, CheckpointError)) as e:  # the converter's or the checkpoint layer's
        convert(ConvertSettings(cfg, ckpt, str(out), verify=False))
    assert isinstance(e.value, UserError) and e.value.exit_code == 2
    for message in messages:
        assert message in str(e.value), str(e.value)
    assert not out.exists()

    capsys.readouterr()
    assert main([cfg, ckpt, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for message in messages:
        assert message in err, err
    assert not out.exists()


def test_non_empty_out_dir_needs_force_and_force_replaces_it_whole(good, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")

    with pytest.raises(ConvertError, match=f"OUT_DIR {busy} is not empty; pass --force"):
        convert(ConvertSettings(good["cfg"], good["ckpt"], str(busy), verify=False))
    capsys.readouterr()
    assert main([good["cfg"], good["ckpt"], str(busy), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT_DIR {busy} is not empty") and "--force" in err and err.count("\n") == 1
    assert os.listdir(busy) == ["x"] and (busy / "x").read_text() == "keep me"

    # --force replaces a model directory, never a user's other files
    assert main([good["cfg"], good["ckpt"], str(busy), "--no-verify", "--force"]) == 2
    assert "did not write (x)" in capsys.readouterr().err and (busy / "x").read_text() == "keep me"
    # the control: over an earlier model the same checkpoint and config convert, and no old file stays behind
    (busy / "x").unlink()
    (busy / "model-00001-of-00002.safetensors").write_text("an earlier, sharded model")
    assert main([good["cfg"], good["ckpt"], str(busy), "--no-verify", "--force"]) == 0
    assert os.listdir(busy) and not (busy / "model-00001-of-00002.safetensors").exists()
    assert (busy / "model.safetensors").is_file()


def test_the_good_checkpoint_converts(good, tmp_path):
    """Control for the cases above: nothing but the named fault stands in their way."""
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    convert(ConvertSettings(good["cfg"], good["ckpt"], str(out), verify=False))
    saved = load_file(str(out / "model.safetensors"))
    want = {("model." + k[4:] if k.startswith("llm.") else k): v for k, v in good["state"].items()}
    assert saved.keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)
