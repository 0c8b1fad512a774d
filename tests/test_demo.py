"""`make demo`'s pipeline really learns: held-out accuracy >= 0.90 after training."""
import json
import os

import pytest

pytestmark = pytest.mark.integration


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
