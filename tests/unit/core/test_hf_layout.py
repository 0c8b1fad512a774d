"""polar_xtuner.hf_layout: what a tool process imports to load a POLAR model."""
import subprocess
import sys

import torch

IDS = [[5, 6, 7, 4]]


def _score(model) -> float:
    ids = torch.tensor(IDS)
    return float(model(input_ids=ids, attention_mask=torch.ones_like(ids))[0].sum())


def test_loading_a_model_for_scoring_leaves_torchvision_unimported(tiny_dir, tiny_model):
    """load_model (eval_pref's path) in a fresh interpreter: no torchvision, and the same score as here."""
    code = f"""
import sys
import torch
from polar_xtuner.scoring.local import load_model
model = load_model({tiny_dir!r}, device="cpu")[0]
ids = torch.tensor({IDS!r})
assert "transformers.modeling_utils" in sys.modules
print("torchvision" in sys.modules, float(model(input_ids=ids, attention_mask=torch.ones_like(ids))[0].sum()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported, score = proc.stdout.splitlines()[-1].split()
    assert imported == "False"  # transformers would import it (and torch._dynamo) for its image utilities
    assert _score(tiny_model) == float(score)  # the model this worker loaded scores the same
