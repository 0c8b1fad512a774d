"""`make demo`'s pipeline on the LoRA demo config with every loss option on: it learns, and it converts both ways.

One training serves two subjects, each of which used to train a demo of its own (a minute
of one core each):

* LoRA (configs/POLAR_tiny_lora_varlenattn_demo.py): the adapters and the value head,
  trained in full, are saved; scripts/demo.sh converts them to a merged model through
  tools/convert.sh, and here the converter's main() writes a PEFT adapter directory; both
  score the held-out pairs alike.
* The loss options (margins from the data, reward centering, the fp32 loss), off in every
  shipped config: each term is logged, and training with all three still learns. They act on
  the rewards alone (polar_xtuner/train/objectives.py), whatever produced them, so a LoRA
  model exercises them as a full one does.

Held-out accuracy >= 0.80 (issue #18's LoRA bar) after two epochs (106 shared-prefix
steps): seeds 0-5 ended at 0.845-0.930 (bench/README.md, "Demo robustness").
The LoRA config as shipped trains in tests/integration/convert/test_lora.py (ZeRO-3, then
tools/convert.sh); the full demo as shipped is the session's demo (tests/e2e/test_demo.py).
"""
import json
import os
import re

import pytest

from common import REPO, load_tool, run_tool, saved_scores

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # scripts/demo.sh, two epochs: ~60 s, measured

LORA_DEMO = os.path.join(REPO, "configs", "POLAR_tiny_lora_varlenattn_demo.py")
VAL = os.path.join(REPO, "data", "demo", "val.jsonl")
OPTIONS = "model.margin=True model.center_rewards_coefficient=0.01 model.loss_in_fp32=True train_cfg.max_epochs=2"


@pytest.fixture(scope="module")
def lora_demo(tmp_path_factory):
    """scripts/demo.sh with DEMO_CONFIG (the LoRA demo), DEMO_TRAIN (the demo data with margins) and DEMO_OPTIONS."""
    from polar_xtuner.demo.data import with_margins, write_jsonl
    from polar_xtuner.records import load_records

    root = tmp_path_factory.mktemp("lora_demo")
    train = str(root / "train_margins.jsonl")
    write_jsonl(train, with_margins(load_records(os.path.join(REPO, "data", "demo", "train.jsonl"))))
    demo_dir = root / "demo"
    proc = run_tool("bash", "scripts/demo.sh", env={"DEMO_DIR": str(demo_dir), "DEMO_CONFIG": LORA_DEMO,
                                                    "DEMO_TRAIN": train, "DEMO_OPTIONS": OPTIONS,
                                                    "MIN_ACCURACY": "0.80", "TINY_DIR": str(root / "tiny")},
                    timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "dir": demo_dir, "tiny": str(root / "tiny"), "proc": proc,
            "work": str(demo_dir / "train"), "cfg": str(demo_dir / "train" / os.path.basename(LORA_DEMO))}


def test_it_learns_with_every_loss_option_logged(lora_demo):
    report = json.load(open(lora_demo["dir"] / "eval.json"))
    before = json.load(open(lora_demo["dir"] / "eval_untrained.json"))
    assert report["n"] == before["n"] == 200
    assert report["accuracy"] >= 0.80 and before["accuracy"] < 0.75, (before["accuracy"], report["accuracy"])
    log = open(lora_demo["dir"] / "train.log").read()
    assert "loss options LossSettings(margin=True, center_rewards_coefficient=0.01, loss_in_fp32=True)" in log
    last = [line for line in log.splitlines() if "Iter(train)" in line][-1]
    for term in ("ranking_term:", "center_term:"):
        assert term in last, last
    margin = float(re.search(r"margin_mean: ([0-9.]+)", last).group(1))
    assert 0.5 <= margin <= 2.0, last  # the data's margins are 0.5 and 2.0
    total = int(re.findall(r"Iter\(train\) \[\s*\d+/(\d+)\]", log)[-1])
    assert total == 106, total  # two epochs of the demo's 53 shared-prefix rows


def test_merged_and_adapter_conversions_score_alike(lora_demo, capsys):
    """The merged model (tools/convert.sh, in demo.sh) and a PEFT adapter directory (the converter's main() here)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from polar_xtuner.convert.export import main as convert

    assert "LoRA checkpoint" in lora_demo["proc"].stdout and "bit for bit" in lora_demo["proc"].stdout
    merged, adapter = lora_demo["dir"] / "hf", lora_demo["root"] / "adapter"
    assert convert([lora_demo["cfg"], lora_demo["work"], str(adapter), "--adapter"]) == 0, \
        capsys.readouterr().err[-3000:]
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()

    base_head = load_file(os.path.join(lora_demo["tiny"], "model.safetensors"))["v_head.weight"]
    merged_head = load_file(str(merged / "model.safetensors"))["v_head.weight"]
    assert not torch.equal(merged_head, base_head)  # the trained head, not the base's
    # the adapter directory loads with peft alone, head included
    base = AutoModel.from_pretrained(lora_demo["tiny"], trust_remote_code=True)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    assert torch.equal(peft_model.base_model.model.v_head.modules_to_save["default"].weight.detach(), merged_head)

    out = lora_demo["root"] / "adapter.json"
    args = ["--model", str(adapter), "--data", VAL, "--out", str(out), "--save-scores", str(out) + "l"]
    assert load_tool("eval_pref").main(args) == 0, capsys.readouterr().err[-3000:]
    m, a = saved_scores(lora_demo["dir"] / "scores.jsonl"), saved_scores(str(out) + "l")
    worst = max(abs(x - y) / max(1.0, abs(y)) for pm, pa in zip(m, a) for x, y in zip(pm, pa))
    assert len(m) == len(a) == 200 and worst < 1e-4, worst
    assert json.load(open(out))["accuracy"] == json.load(open(lora_demo["dir"] / "eval.json"))["accuracy"]
