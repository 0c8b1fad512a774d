"""polar_xtuner/rl/reward.py with tools/eval_pref.py's own process: POLAR_NORMALIZE uses the statistics --write-stats saved."""
import asyncio
import json
import os

import pytest
import torch

from common import REPO, polar_env, run_tool
from fakes import FakeServer, local_candidate_scores, verl_reward_loop
from polar_xtuner import rft
from polar_xtuner.demo.data import generate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rft")]


def test_normalisation_uses_the_saved_stats(monkeypatch, tmp_path, tiny_dir, tiny_model, tokenizer):
    import shutil

    model_dir = str(tmp_path / "model")
    shutil.copytree(tiny_dir, model_dir)
    recs = list(generate(4, 27))
    server = FakeServer("vllm", tiny_model, tokenizer)
    polar_env(monkeypatch, server, model_dir, POLAR_NORMALIZE=1)
    try:
        with pytest.raises(rft.RFTConfigError, match="--write-stats"):
            asyncio.run(verl_reward_loop(recs, ["x"] * 4))
        proc = run_tool("python", "tools/eval_pref.py", "--model", model_dir, "--data",
                        f"{REPO}/data/demo/val.jsonl", "--write-stats")
        assert proc.returncode == 0, proc.stderr[-2000:]
        stats = json.load(open(os.path.join(model_dir, rft.STATS_FILE)))
        assert stats["n"] == 400 and stats["std"] > 0
        rft.forget_rewards()
        normed = asyncio.run(verl_reward_loop(recs, [r["chosen"][0]["content"] for r in recs]))
    finally:
        server.close()
    raw = local_candidate_scores(tiny_model, tokenizer, recs)[0::2]
    expected = [(x - stats["mean"]) / stats["std"] for x in raw]
    assert torch.allclose(torch.tensor(normed), torch.tensor(expected), atol=1e-3)
