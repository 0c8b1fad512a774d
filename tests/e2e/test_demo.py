"""`make demo`'s pipeline really learns: held-out accuracy >= 0.90 after training."""
import json
import os

import pytest

from common import run_tool

# every test runs (or reads) a whole `make demo` pipeline: ~110 s each, measured
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_learns(demo_run):
    demo_dir = demo_run
    proc = demo_run.proc
    report = json.load(open(os.path.join(demo_dir, "eval.json")))
    before = json.load(open(os.path.join(demo_dir, "eval_untrained.json")))
    assert report["n"] == before["n"] == 200
    assert report["accuracy"] >= 0.90
    assert before["accuracy"] < 0.75  # it learned, it did not start there
    assert os.path.isfile(os.path.join(demo_dir, "hf", "model.safetensors"))
    assert "held-out accuracy: untrained" in proc.stdout
    # the trained model against the untrained one on the same pairs, with the gain's paired interval
    gain = report["compare"]["difference"]["accuracy"]
    assert gain["difference"] == pytest.approx(report["accuracy"] - before["accuracy"])
    assert 0 < gain["ci95"][0] <= gain["difference"] <= gain["ci95"][1]
    assert report["compare"]["mcnemar"]["p_value"] < 1e-6 and "paired 95% CI" in proc.stdout


def test_encoding_settings_travel_with_the_model(demo_run, tmp_path):
    """The converter saves training's lengths in the model dir, and eval_pref reads them from there."""
    saved = json.load(open(os.path.join(demo_run, "hf", "polar_encoding.json")))
    assert saved == {"max_length": 1024, "max_response_length": 128, "reward_token_id": 4}  # the demo config's
    report = json.load(open(os.path.join(demo_run, "eval.json")))
    assert report["encoding"]["max_length"] == 1024 and report["encoding"]["max_response_length"] == 128
    assert report["encoding"]["source"].endswith("polar_encoding.json")
    # an explicit flag still wins, and says so
    out = tmp_path / "r.json"
    proc = run_tool("python", "tools/eval_pref.py", "--model", os.path.join(demo_run, "hf"), "--data",
                    "data/demo/val.jsonl", "--max-response-length", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    enc = json.load(open(out))["encoding"]
    assert enc["max_response_length"] == 8 and enc["max_length"] == 1024 and "explicit" in enc["source"]
