"""LoRA and QLoRA: the value head is trained, saved and converted; QLoRA refuses CPU cleanly.

The LoRA demo's learning run, with its adapter directory, is tests/e2e/test_lora_demo.py.
"""
import json
import os

import pytest
import torch

from common import REPO, build_reward_model, copy_config, load_tool, run_in_process, run_tool

pytestmark = pytest.mark.integration

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["wqkv", "wo", "w1", "w2", "w3"], bias="none")
TINY_LORA = os.path.join(REPO, "configs", "POLAR_tiny_lora_varlenattn_demo.py")
QLORA = os.path.join(REPO, "configs", "POLAR_7B_qlora_varlenattn_custom_dataset.py")
VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def _lora_model(tiny_dir):
    from peft import LoraConfig

    return build_reward_model(tiny_dir, lora=dict(type=LoraConfig, **LORA))


def test_lora_checkpoint_holds_the_adapters_and_the_trainable_head(tiny_dir):
    model = _lora_model(tiny_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "v_head.weight" in trainable and all("lora_" in n for n in trainable - {"v_head.weight"})
    sd = model.state_dict()
    assert "v_head.weight" in sd  # xtuner's RewardModel.state_dict drops it under LoRA
    assert set(sd) - {"v_head.weight"} and all("lora_" in k for k in set(sd) - {"v_head.weight"})
    prefixed = model.state_dict(prefix="module.")
    assert "module.v_head.weight" in prefixed


def _save_pth(path, sd):
    torch.save({"state_dict": {k: v.detach().clone() for k, v in sd.items()}, "meta": {}}, path)


def test_convert_refuses_an_untrained_or_missing_head(tiny_dir, tmp_path, capsys):
    """A head equal to the base's, or none: one line, exit 2, nothing written.

    The first case through tools/convert.sh's process; the others through the
    converter's main() here (the same code, without 3 s of start-up each).
    """
    from polar_xtuner.convert.export import main

    def convert(*args):
        if args[1].endswith("same_head.pth"):
            return run_tool("bash", "tools/convert.sh", *args)
        return run_in_process(main, args, capsys)

    cfg = copy_config(str(tmp_path), "polar_lora_refuse.py", tiny_dir, VAL,
                      append="\nfrom peft import LoraConfig\nmodel['lora'] = dict(type=LoraConfig, **%r)\n" % LORA)
    sd = _lora_model(tiny_dir).state_dict()
    with torch.no_grad():  # adapters that did train, so only the head is at fault
        for k in sd:
            if "lora_B" in k:
                sd[k] = torch.randn_like(sd[k]) * 0.01
    _save_pth(tmp_path / "same_head.pth", sd)
    _save_pth(tmp_path / "no_head.pth", {k: v for k, v in sd.items() if k != "v_head.weight"})
    for name, msg in [("same_head.pth", "equals the base model's: the head was never trained"),
                      ("no_head.pth", "has no v_head.weight")]:
        out = tmp_path / f"out_{name}"
        proc = convert(cfg, str(tmp_path / name), str(out))
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and msg in lines[-1], lines[-1]
        assert not out.exists() or not os.listdir(out)
    # --adapter on a full checkpoint is a user mistake too
    full = build_reward_model(tiny_dir).state_dict()
    _save_pth(tmp_path / "full.pth", full)
    proc = convert(cfg, str(tmp_path / "full.pth"), str(tmp_path / "o"), "--adapter")
    assert proc.returncode == 2 and "--adapter needs a LoRA checkpoint" in proc.stderr


def test_qlora_config_refuses_cpu_with_one_line(tiny_dir, capsys):
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    cfg = Config.fromfile(QLORA)
    assert cfg.model.llm.quantization_config.load_in_4bit is True
    assert (cfg.lora_r, cfg.lora_target_modules) == (16, ["wqkv", "wo", "w1", "w2", "w3"])
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: QLoRA may run here")
    cfg.model.llm.pretrained_model_name_or_path = tiny_dir
    with pytest.raises(SystemExit) as e:
        BUILDER.build(cfg.model)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: QLoRA") and "CUDA" in err[0]


def _train(tmp_path, tiny_dir, stage, **overrides):
    work = str(tmp_path / f"work_{stage}")
    options = [f"{k}.pretrained_model_name_or_path={tiny_dir}"
               for k in ("tokenizer", "model.llm", "train_dataloader.dataset.tokenizer", "custom_hooks.0.tokenizer")]
    options += [f"{k}={v}" for k, v in overrides.items()]
    proc = run_tool("xtuner", "train", TINY_LORA, "--deepspeed",
                    os.path.join(REPO, "configs", "deepspeed", f"polar_{stage}_cpu.json"),
                    "--work-dir", work, "--cfg-options", *options, timeout=900)
    assert os.path.isfile(os.path.join(work, "last_checkpoint")), proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


@pytest.mark.slow  # ~30 s measured
def test_lora_under_zero3_converts(tmp_path, tiny_dir):
    """The LoRA demo config as shipped (paths and sizes swapped) through `xtuner train`, tools/convert.sh and scoring.

    The conversion of a ZeRO-3 LoRA checkpoint, not learning: the val file's 200 pairs
    (13 packed steps) train the head enough to tell it from the base's. Learning, the
    PEFT adapter directory and the ZeRO-2 checkpoint are tests/e2e/test_lora_demo.py's.
    """
    from safetensors.torch import load_file

    work = _train(tmp_path, tiny_dir, "zero3", **{"train_cfg.max_epochs": 1,
                                                  "train_dataloader.dataset.data_files": VAL})
    trained_cfg = os.path.join(work, os.path.basename(TINY_LORA))
    proc = run_tool("bash", "tools/convert.sh", trained_cfg, work, str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA checkpoint" in proc.stdout and "bit for bit" in proc.stdout
    base_head = load_file(os.path.join(tiny_dir, "model.safetensors"))["v_head.weight"]
    assert not torch.equal(load_file(str(tmp_path / "merged" / "model.safetensors"))["v_head.weight"], base_head)
    # scored, as tests/integration/test_configs_train.py scores every config it trains (eval_pref's main() here)
    report = tmp_path / "report.json"
    assert load_tool("eval_pref").main(["--model", str(tmp_path / "merged"), "--data", VAL, "--out", str(report)]) == 0
    result = json.load(open(report))
    assert result["n"] == 200 and 0.0 <= result["accuracy"] <= 1.0


def test_serve_refuses_an_adapter_directory_with_what_to_do(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    proc = run_tool("bash", "tools/serve.sh", str(tmp_path))
    assert proc.returncode == 2 and "LoRA adapter directory" in proc.stderr and "without --adapter" in proc.stderr
