"""Checkpoint pointers, truncated files and training work dirs given as models (issue 27, classes 1-3).

* a work dir's ``last_checkpoint`` is resolved by its file name inside the
  directory given (a copied work dir converts its own checkpoint); an empty
  pointer, one naming itself or the directory, or one naming a checkpoint
  missing inside is one ``error:`` line naming the pointer file, exit 2
  (it was an endless recursion); ``--resume auto`` follows the same rule;
* a truncated file inside a checkpoint or model dir is named by its own path,
  exit 2, no traceback: DeepSpeed model and optimizer states, a ``.pth``, a
  safetensors shard (evaluation, and the base model of a LoRA conversion),
  a LoRA adapter file;
* a training work dir given as a model (``POLAR_MODEL``, ``--tokenizer``,
  ``--model``) is one line naming the variable or flag, saying to convert it.
"""
import json
import os
import shutil

import pytest
import torch

from common import VAL, copy_config, free_port, one_error_line, run_tool, run_tool_here

pytestmark = pytest.mark.integration

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["wqkv", "wo", "w1", "w2", "w3"], bias="none")


def _cut(path) -> None:
    """Truncate a file to half its size, as an interrupted copy leaves it."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _convert(capsys, *args):
    from polar_xtuner.convert.export import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- class 1: pointers ----------------------------------------------------------------------------------


def test_a_copied_work_dir_converts_its_own_checkpoint_and_says_so(pth_run, tmp_path, capsys):
    from safetensors.torch import load_file

    copy = tmp_path / "copy"
    shutil.copytree(pth_run["work"], copy)  # its last_checkpoint still names the original's file
    changed = dict(pth_run["state"], **{"v_head.weight": pth_run["state"]["v_head.weight"] + 1.0})
    torch.save({"state_dict": changed, "meta": {}}, copy / "iter_1.pth")
    code, out, err = _convert(capsys, pth_run["cfg"], copy, tmp_path / "hf", "--no-verify")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(copy / "last_checkpoint") in notes[0] and str(copy / "iter_1.pth") in notes[0]
    assert f"checkpoint {copy / 'iter_1.pth'}" in out
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(saved["v_head.weight"], changed["v_head.weight"])  # the copy's, not the original's


@pytest.mark.parametrize("pointer", ["", "\n", "last_checkpoint", "{work}", "{work}/", ".", "..",
                                     "{original}/iter_9.pth", "iter_9.pth"])
def test_a_bad_pointer_is_one_line_naming_it(pointer, pth_run, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(pth_run["work"], work)
    (work / "last_checkpoint").write_text(pointer.format(work=work, original=pth_run["work"]))
    code, out, err = _convert(capsys, pth_run["cfg"], work, tmp_path / "hf")
    assert code == 2, err
    line = one_error_line(err)
    assert line.startswith(f"error: {work / 'last_checkpoint'}") and "RecursionError" not in err, line
    assert not (tmp_path / "hf").exists()


def test_resume_auto_reads_the_pointer_by_the_same_rule(pth_run, tmp_path, capsys):
    from polar_xtuner.train.launch import LaunchError, command

    work = tmp_path / "copy"
    shutil.copytree(pth_run["work"], work)
    cmd = command([pth_run["cfg"], "--work-dir", str(work), "--resume", "auto"], env={})
    assert cmd[cmd.index("--resume") + 1] == str(work / "iter_1.pth")  # not the original's
    assert "note:" in capsys.readouterr().err
    for bad in ("", "last_checkpoint", str(work)):
        (work / "last_checkpoint").write_text(bad)
        with pytest.raises(LaunchError, match=str(work / "last_checkpoint")):
            command([pth_run["cfg"], "--work-dir", str(work), "--resume", "auto"], env={})


# -- class 2: truncated files are named -----------------------------------------------------------------


def test_a_truncated_pth_in_a_work_dir_is_named(pth_run, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(pth_run["work"], work)
    _cut(work / "iter_1.pth")
    code, out, err = _convert(capsys, pth_run["cfg"], work, tmp_path / "hf")
    line = one_error_line(err)
    assert code == 2 and f"checkpoint {work / 'iter_1.pth'}:" in line and "truncated" in line, line
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def deepspeed_ckpt(tiny_dir, tmp_path_factory):
    """A real one-process ZeRO-2 checkpoint of the tiny model (bench/convert_memory.py), written once."""
    root = tmp_path_factory.mktemp("ds_faults")
    proc = run_tool("python", "-m", "bench.convert_memory", "--write-deepspeed", tiny_dir, str(root), "2",
                    env={"MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "iter_1.pth"


@pytest.mark.parametrize("which", ["model_states.pt", "optim_states.pt"])
def test_a_truncated_deepspeed_file_is_named_by_its_own_path(which, deepspeed_ckpt, pth_run, tmp_path):
    ckpt = tmp_path / "iter_1.pth"
    shutil.copytree(deepspeed_ckpt, ckpt)
    victim = next(p for p in ckpt.iterdir() if p.name.endswith(which))
    _cut(victim)
    proc = run_tool("bash", "tools/convert.sh", pth_run["cfg"], str(ckpt), str(tmp_path / "hf"))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"checkpoint {victim}:" in line and "truncated" in line, line
    assert not (tmp_path / "hf").exists()


def _sharded_copy(tiny_dir, dst):
    """The tiny model saved in several safetensors shards (with their index)."""
    from transformers import AutoModel

    shutil.copytree(tiny_dir, dst)
    os.remove(dst / "model.safetensors")
    AutoModel.from_pretrained(tiny_dir, trust_remote_code=True).save_pretrained(dst, max_shard_size="2MB")
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and (dst / "model.safetensors.index.json").exists()
    return shards


def test_a_truncated_safetensors_shard_is_named_when_evaluating(tiny_dir, tmp_path, capsys):
    shards = _sharded_copy(tiny_dir, tmp_path / "model")
    _cut(shards[1])
    proc = run_tool_here(capsys, "eval_pref", "--model", tmp_path / "model", "--data", VAL)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"{shards[1]} is truncated" in line, line


def _lora_run(tiny_dir, tmp_path, base):
    """A LoRA config over ``base`` and a LoRA checkpoint with trained adapters and head."""
    from peft import LoraConfig

    from common import build_reward_model

    cfg = copy_config(str(tmp_path), "polar_lora_faults.py", str(base), VAL,
                      append="\nfrom peft import LoraConfig\nmodel['lora'] = dict(type=LoraConfig, **%r)\n" % LORA)
    sd = build_reward_model(tiny_dir, lora=dict(type=LoraConfig, **LORA)).state_dict()
    with torch.no_grad():
        for k in sd:
            if "lora_B" in k or k == "v_head.weight":
                sd[k] = torch.randn_like(sd[k]) * 0.01
    torch.save({"state_dict": {k: v.detach().clone() for k, v in sd.items()}, "meta": {}}, tmp_path / "lora.pth")
    return cfg, tmp_path / "lora.pth"


def test_a_truncated_base_model_of_a_lora_conversion_is_named(tiny_dir, tmp_path):
    base = tmp_path / "base"
    shards = _sharded_copy(tiny_dir, base)
    cfg, ckpt = _lora_run(tiny_dir, tmp_path, base)
    _cut(shards[0])
    proc = run_tool("bash", "tools/convert.sh", cfg, str(ckpt), str(tmp_path / "hf"))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"{shards[0]} is truncated" in line, line
    assert not (tmp_path / "hf").exists()


def test_a_truncated_tokenizer_of_the_base_model_is_named(pth_run, tiny_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    _cut(base / "tokenizer.json")
    cfg = copy_config(str(tmp_path), "polar_cut_tokenizer.py", str(base), VAL)
    code, out, err = _convert(capsys, cfg, pth_run["work"] / "iter_1.pth", tmp_path / "hf")
    line = one_error_line(err)
    assert code == 2 and f"{base / 'tokenizer.json'} is truncated" in line, line
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("victim", ["adapter", "base"])
def test_a_truncated_lora_adapter_or_its_base_is_named(victim, tiny_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    model = AutoModel.from_pretrained(str(base), trust_remote_code=True)
    peft_model = get_peft_model(model, LoraConfig(**LORA, modules_to_save=["v_head"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    for name in os.listdir(base):  # the tokenizer travels with the adapter, as --adapter writes it
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(base / name, adapter / name)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    file = adapter / "adapter_model.safetensors" if victim == "adapter" else base / "model.safetensors"
    _cut(file)
    proc = run_tool_here(capsys, "eval_pref", "--model", adapter, "--data", VAL)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"{file} is truncated" in line, line


# -- class 3: a training work dir where a converted model is needed ---------------------------------------


def _work_dir_with_config_copy(pth_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(pth_run["work"], work)
    shutil.copy(pth_run["cfg"], work / "polar_ckpt_faults.py")  # xtuner keeps the config in the work dir
    return work


def _says_convert_first(line: str, label: str):
    assert label in line and "training work dir" in line and "tools/convert.sh" in line, line
    assert "--trust-remote-code" not in line and len(line) < 400, line


def test_polar_model_naming_a_work_dir_is_one_line(pth_run, tmp_path):
    from polar_xtuner.rl.reward import PolarReward, RFTConfigError, RFTSettings

    work = _work_dir_with_config_copy(pth_run, tmp_path)
    with pytest.raises(RFTConfigError) as e:
        PolarReward(RFTSettings(server_address="127.0.0.1:1", model=str(work)))
    assert "\n" not in str(e.value)
    _says_convert_first(str(e.value), f"POLAR_MODEL={work}")


def test_tokenizer_or_model_naming_a_work_dir_is_one_line(pth_run, tmp_path, capsys):
    work = _work_dir_with_config_copy(pth_run, tmp_path)
    proc = run_tool("python", "tools/build_dataset.py", VAL, "-o", str(tmp_path / "out"), "--tokenizer", str(work))
    assert proc.returncode == 2
    _says_convert_first(one_error_line(proc.stderr), f"--tokenizer {work}")
    proc = run_tool_here(capsys, "eval_pref", "--model", work, "--data", VAL)
    assert proc.returncode == 2
    _says_convert_first(one_error_line(proc.stderr), f"--model {work}")
