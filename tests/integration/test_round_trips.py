"""Every file a tool writes is accepted by every tool that reads that kind of file (issue #42).

One row per (writer, reader) pair. The writers run once (module fixture) on
small inputs, through their ``main()``; each reader then takes the written file
as a user would pass it, and must accept all of it: the same number of
records, or the model loading and scoring.
"""
import json
import os

import pytest

from common import REPO, copy_config, load_tool

pytestmark = pytest.mark.integration  # every writer and reader of the project in one place

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_dir):
    """What each writer writes: demo data, a built dataset, saved scores, statistics, RL data, a model."""
    import shutil

    tmp = tmp_path_factory.mktemp("round_trips")
    out = {}
    assert load_tool("make_demo_data").main([str(tmp / "demo"), "--train", "40", "--val", "20"]) == 0
    out["make_demo_data"] = str(tmp / "demo" / "train.jsonl")
    assert load_tool("build_dataset").main([out["make_demo_data"], "-o", str(tmp / "built"),
                                            "--val-size", "10"]) == 0
    out["build_dataset"] = str(tmp / "built" / "train.jsonl")
    out["build_dataset val"] = str(tmp / "built" / "val.jsonl")
    assert load_tool("make_tiny_model").main([str(tmp / "tiny")]) == 0
    out["make_tiny_model"] = str(tmp / "tiny")
    model = tmp / "model"  # --write-stats writes into the model directory: a copy of the session's
    shutil.copytree(tiny_dir, model)
    assert load_tool("eval_pref").main(["--model", str(model), "--data", VAL, "--save-scores",
                                        str(tmp / "scores.jsonl"), "--write-stats"]) == 0
    out["eval_pref --save-scores"] = str(tmp / "scores.jsonl")
    out["eval_pref --write-stats"] = str(model)
    for ext in ("parquet", "jsonl"):
        assert load_tool("make_rft_data").main([out["build_dataset"], "-o", str(tmp / f"rl.{ext}")]) == 0
        out[f"make_rft_data .{ext}"] = str(tmp / f"rl.{ext}")
    out["tmp"] = tmp
    return out


def _lines(path):
    return sum(1 for line in open(path, encoding="utf-8") if line.strip())


PAIR_DATA = ["make_demo_data", "build_dataset", "build_dataset val"]


@pytest.mark.parametrize("writer", PAIR_DATA)
@pytest.mark.parametrize("reader", ["build_dataset", "eval_pref --data", "make_rft_data", "training dataset",
                                    "PolarEvalHook"])
def test_pair_data_is_read_whole_by_every_reader(writer, reader, written, tiny_dir, tokenizer, tmp_path):
    path = written[writer]
    n = _lines(path)
    if reader == "build_dataset":
        assert load_tool("build_dataset").main([path, "-o", str(tmp_path / "again")]) == 0
        assert _lines(tmp_path / "again" / "train.jsonl") == n
    elif reader == "eval_pref --data":
        assert load_tool("eval_pref").main(["--model", tiny_dir, "--data", path, "--out", str(tmp_path / "r.json")]) == 0
        assert json.load(open(tmp_path / "r.json"))["records"] == n
    elif reader == "make_rft_data":
        assert load_tool("make_rft_data").main([path, "-o", str(tmp_path / "rl.jsonl")]) == 0
        assert _lines(tmp_path / "rl.jsonl") > 0
    elif reader == "training dataset":
        from polar_xtuner.data.dataset import build_polar_dataset

        # whole pairs, unpacked: the reader is under test here, one item per record (the shipped
        # packing and shared prefixes are test_configs_exact.py's and test_configs_train.py's)
        ds = build_polar_dataset(data_files=path, tokenizer=tokenizer, max_length=512, max_response_length=128,
                                 reward_token_id=None, use_varlen_attn=False)
        assert len(ds) == n
    else:
        import types

        from polar_xtuner.train.eval_hook import PolarEvalHook

        hook = PolarEvalHook(path, tokenizer, max_length=512, max_response_length=128)
        hook.before_train(types.SimpleNamespace())
        assert len(hook._ids) == 2 * n


def test_saved_scores_are_read_by_compare(written, tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert load_tool("eval_pref").main(["--model", tiny_dir, "--data", VAL, "--compare",
                                        written["eval_pref --save-scores"], "--out", str(out)]) == 0
    assert json.load(open(out))["compare"]["difference"]["accuracy"]["difference"] == pytest.approx(0.0, abs=1e-9)


def test_saved_scores_of_data_with_a_skipped_record_are_read_by_compare(tiny_dir, tmp_path, capsys):
    """The issue's case: the skipped record's line has no digest, and --compare refused the whole file."""
    data = tmp_path / "d.jsonl"
    lines = open(VAL).readlines()[:20]
    bad = json.loads(lines[3])
    data.write_text("".join(lines[:3]) + json.dumps({**bad, "rejected": bad["chosen"]}) + "\n" + "".join(lines[4:]))
    main = load_tool("eval_pref").main
    assert main(["--model", tiny_dir, "--data", str(data), "--save-scores", str(tmp_path / "s.jsonl")]) == 0
    assert any("error" in json.loads(line) for line in open(tmp_path / "s.jsonl"))
    assert main(["--model", tiny_dir, "--data", str(data), "--compare", str(tmp_path / "s.jsonl"),
                 "--out", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    assert json.load(open(tmp_path / "r.json"))["records"] == 19


def test_written_statistics_are_read_by_the_rl_reward(written):
    from polar_xtuner.rl.reward import reward_stats

    mean, std = reward_stats(written["eval_pref --write-stats"])
    assert std > 0 and mean == mean


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_rl_data_is_what_verl_and_openrlhf_read(ext, written):
    """The prompts and references come back out (the frameworks' own loaders: tests/integration/serve/test_serve.py)."""
    path = written[f"make_rft_data .{ext}"]
    if ext == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        assert all(r["reward_model"]["style"] == "polar" and r["reward_model"]["ground_truth"] for r in rows)
    else:
        rows = [json.loads(line) for line in open(path)]
        assert all(json.loads(r["label"])["reference"] for r in rows)
    assert len(rows) > 0


@pytest.mark.parametrize("reader", ["eval_pref --model", "build_dataset --tokenizer", "convert base"])
def test_a_written_model_directory_is_read_by_every_reader(reader, written, tmp_path, capsys):
    model = written["make_tiny_model"]
    if reader == "eval_pref --model":
        assert load_tool("eval_pref").main(["--model", model, "--data", VAL]) == 0
    elif reader == "build_dataset --tokenizer":
        assert load_tool("build_dataset").main([VAL, "-o", str(tmp_path / "o"), "--tokenizer", model]) == 0
    else:  # a written model is a base another run trains from: its config builds the training model
        from mmengine.config import Config
        from xtuner.registry import BUILDER

        cfg = Config.fromfile(copy_config(str(tmp_path), "polar_round_trip.py", model, VAL))
        assert BUILDER.build(cfg.model).v_head is not None
    capsys.readouterr()
