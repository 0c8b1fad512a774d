"""The real pipeline on the tiny model: `xtuner train` -> tools/convert.sh -> tools/eval_pref.py."""
import json
import math
import os
import re

import pytest
import torch

from common import REPO, assert_converted, copy_config, run_tool

pytestmark = pytest.mark.integration

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def train(tmp_path, cfg):
    work = str(tmp_path / "work")
    proc = run_tool("xtuner", "train", cfg, "--work-dir", work)
    # xtuner's CLI exits 0 even when training fails: judge by the checkpoint.
    assert os.path.isfile(os.path.join(work, "last_checkpoint")), proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


# The DeepSpeed stages train elsewhere, each once, and reuse what they built: ZeRO-2 is the
# session's demo (tests/e2e/test_demo.py), ZeRO-1 and ZeRO-3 the runs of test_distributed.py.
@pytest.fixture(scope="module", params=[None], ids=["no-deepspeed"])
def trained(request, tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp(f"run_{request.param}")
    # rows of 512 tokens hold ~4 pairs: ~50 packed steps (the 3% warm-up needs >= 34). Whole
    # sequences (shared_prefix = False, the sp4 config's path); the demo, LoRA and loss-option
    # tests train with shared prefixes (19 larger steps here)
    cfg = copy_config(str(tmp), f"polar_it_{request.param}.py", tiny_dir, VAL, shared_prefix=False,
                      max_epochs=1, max_length=256, save_steps=20, evaluation_freq=20)
    work, proc = train(tmp, cfg)
    return {"tmp": tmp, "cfg": cfg, "work": work, "log": proc.stdout + proc.stderr}


@pytest.mark.slow  # the `trained` fixture trains the tiny model (about 20 s, measured)
def test_training_ran_and_logged_the_ranking_loss(trained):
    # the pattern takes nan/inf too, so a diverged run fails here instead of matching nothing
    losses = [float(x) for x in re.findall(r"\bloss: ([-+]?(?:nan|inf|[0-9.]+(?:e[-+]?[0-9]+)?))",
                                           trained["log"], flags=re.I)]
    assert losses and all(math.isfinite(x) for x in losses), losses  # finite, logged
    assert "attn_implementation=sdpa" in trained["log"]
    ckpt = open(os.path.join(trained["work"], "last_checkpoint")).read().strip()
    total = int(re.findall(r"Iter\(train\) \[\s*\d+/(\d+)\]", trained["log"])[-1])
    assert total >= 34 and ckpt.endswith(f"iter_{total}.pth")
    assert "varlen attention backend 'sdpa'" in trained["log"]
    assert os.path.isfile(os.path.join(trained["work"], re.sub(r"^.*/", "", ckpt)))  # a .pth file, no DeepSpeed dir


@pytest.mark.slow  # the `trained` fixture trains the tiny model (about 20 s, measured)
def test_convert_verify_and_evaluate(trained):
    out = str(trained["tmp"] / "hf")
    proc = run_tool("bash", "tools/convert.sh", trained["cfg"], trained["work"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"largest relative score difference ([0-9.e+-]+)", proc.stdout)
    assert m and float(m.group(1)) <= 1e-4

    # the weights are exactly the .pth's (DeepSpeed checkpoints: test_demo.py and test_distributed.py)
    ckpt = open(os.path.join(trained["work"], "last_checkpoint")).read().strip()
    assert_converted(out, torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])

    report_path = str(trained["tmp"] / "eval.json")
    scores_path = str(trained["tmp"] / "scores.jsonl")
    proc = run_tool("python", "tools/eval_pref.py", "--model", out, "--data", VAL,
                    "--out", report_path, "--save-scores", scores_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(report_path))
    assert report["n"] == 200 and {"accuracy", "ties", "margin", "accuracy_ci95"} <= set(report)
    rows = [json.loads(line) for line in open(scores_path)]
    assert len(rows) == 200
    acc = sum(r["chosen"] > r["rejected"] for r in rows) / len(rows)
    assert acc == pytest.approx(report["accuracy"])
    assert "accuracy" in proc.stdout

    # the same accuracy as PolarEvalHook measured on the val file at the end of training
    during = re.findall(r"PolarEvalHook: iter (\d+) val/pref_accuracy ([0-9.]+)", trained["log"])
    total = re.findall(r"Iter\(train\) \[\s*\d+/(\d+)\]", trained["log"])[-1]
    assert len(during) >= 2 and during[-1][0] == total
    assert float(during[-1][1]) == pytest.approx(report["accuracy"], abs=1e-4)


def test_round_weights_matches_a_cast_and_back():
    import torch.nn as nn

    from polar_xtuner.convert.export import round_weights

    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    want = {k: v.to(torch.bfloat16).float() for k, v in layer.state_dict().items()}
    assert any(not torch.equal(want[k], v) for k, v in layer.state_dict().items())
    round_weights(layer, torch.bfloat16)
    for k, v in layer.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, want[k]), k


@pytest.mark.slow  # the `trained` fixture trains the tiny model (about 20 s, measured)
def test_verification_failure_exits_3(trained, tmp_path, monkeypatch, capsys):
    import polar_xtuner.convert.export as conv

    # Nothing can be within a negative tolerance: the saved model must be reported, not accepted.
    monkeypatch.setattr(conv, "SCORE_TOLERANCE", -1.0)
    out = tmp_path / "hf"
    assert conv.main([trained["cfg"], trained["work"], str(out)]) == 3
    err = capsys.readouterr().err
    assert "verification failed" in err and "scores differ from the checkpoint" in err
    assert not (out / "README.md").exists()  # no model card for an unverified model


def test_bad_training_data_stops_with_file_and_line(tmp_path, tiny_dir):
    bad = os.path.join(REPO, "tests", "assets", "bad_records.jsonl")
    cfg = copy_config(str(tmp_path), "polar_it_bad.py", tiny_dir, bad, max_epochs=1)
    work = str(tmp_path / "work")
    proc = run_tool("xtuner", "train", cfg, "--work-dir", work, timeout=300)
    assert not os.path.exists(os.path.join(work, "last_checkpoint"))
    assert f"{bad}:2: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unavailable_backend_in_the_config_is_refused_at_model_build(tmp_path, tiny_dir, capsys):
    """The config's varlen_attn_backend reaches the model, which refuses one this machine lacks.

    Built in process from the config: how a training error ends `xtuner train` (one
    line, no traceback, no checkpoint) is test_bad_training_data_stops_with_file_and_line's.
    """
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from polar_xtuner.errors import ConfigError

    if "flash_attn" in __import__("polar_xtuner.train.attention", fromlist=["x"]).available_backends():
        pytest.skip("flash-attn is available here")
    cfg = copy_config(str(tmp_path), "polar_it_backend.py", tiny_dir, VAL, max_epochs=1)
    line = "    use_activation_checkpointing=activation_checkpointing,\n"
    text = open(cfg).read()
    assert line in text
    open(cfg, "w").write(text.replace(line, line + "    varlen_attn_backend=\"flash_attn\",\n"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # inside training, the model ends the process with the error's code
        BUILDER.build(Config.fromfile(cfg).model)
    assert e.value.code == ConfigError.exit_code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: varlen_attn_backend='flash_attn' is not available here")
