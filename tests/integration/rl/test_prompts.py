"""tools/make_rft_data.py (polar_xtuner/rl/prompts.py) in its own process: its rows load with HF datasets as verl and OpenRLHF read them."""
import json

import pytest

from common import run_tool
from polar_xtuner import rft
from polar_xtuner.demo.data import generate

pytestmark = pytest.mark.integration


def test_make_rft_data_rows_load_with_datasets(tmp_path):
    import datasets

    src = tmp_path / "in.jsonl"
    recs = list(generate(5, 26))
    lines = [json.dumps(r) for r in recs] + ['{"prompt": "q"}', "not json"]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rl.parquet"
    proc = run_tool("python", "tools/make_rft_data.py", str(src), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {src}:6: missing field 'reference'" in proc.stderr and f"{src}:7: invalid JSON" in proc.stderr
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert len(ds) == 5
    row = ds[0]
    assert row["reward_model"]["style"] == "polar" and row["data_source"] == "polar"
    assert row["reward_model"]["ground_truth"] == [{"role": m["role"], "content": m["content"]}
                                                   for m in recs[0]["reference"]]
    assert row["extra_info"]["prompt"] == row["prompt"] and row["extra_info"]["split"] == "train"
    assert row["ability"] == row["extra_info"]["ability"] == "general"
    # openrlhf: the label carries prompt and reference
    out2 = tmp_path / "rl.jsonl"
    assert run_tool("python", "tools/make_rft_data.py", str(src), "-o", str(out2), "--format", "openrlhf").returncode == 0
    first = json.loads(open(out2).readline())
    assert rft.parse_label(first["label"])[1] == [{"role": m["role"], "content": m["content"]}
                                                  for m in recs[0]["reference"]]
    # refusals
    proc = run_tool("python", "tools/make_rft_data.py", str(src), "-o", str(src))
    assert proc.returncode == 2 and "would overwrite an input" in proc.stderr and src.read_text().count("\n") == 7
    proc = run_tool("python", "tools/make_rft_data.py", str(tmp_path / "none.jsonl"), "-o", str(out))
    assert proc.returncode == 2 and "no such file" in proc.stderr
