"""polar_xtuner/eval/run.py (tools/eval_pref.py's run) in process: its messages name the flag or file that is wrong."""



def test_messages_name_the_flag_or_file_that_is_wrong(tiny_dir, tmp_path, capsys, monkeypatch):
    """--compare, --references and small samples: each message points at what is wrong (issue #42)."""
    import json as _json

    from common import VAL, load_tool, run_in_process

    main = load_tool("eval_pref").main
    monkeypatch.chdir(tmp_path)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    proc = run_in_process(main, ["--model", tiny_dir, "--data", VAL, "--compare", str(not_a_model)], capsys)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --compare {not_a_model}"), proc.stderr

    rows = tmp_path / "rb2.jsonl"
    rows.write_text(_json.dumps({"id": "1", "prompt": "q", "chosen": ["a"], "rejected": ["b"]}) + "\n")
    refs = tmp_path / "refs.jsonl"
    refs.write_text(_json.dumps({"id": "0", "reference": "r"}) + "\n" + _json.dumps({"id": "1", "reference": []}) + "\n")
    proc = run_in_process(main, ["--model", tiny_dir, "--data", str(rows), "--format", "rewardbench2",
                                 "--references", str(refs)], capsys)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --references {refs}:2:"), proc.stderr

    one = tmp_path / "one.jsonl"
    one.write_text(open(VAL).readline())
    proc = run_in_process(main, ["--model", tiny_dir, "--data", str(one), "--out", "r.json"], capsys)
    assert proc.returncode == 0 and "95% CIs from 1 record(s)" in proc.stdout + proc.stderr
    assert "fewer than 30" in _json.load(open("r.json"))["ci95_warning"]


def test_no_shared_prefix_and_its_earlier_name_set_the_same_switch():
    """--no-share-prefix, the flag's name before the feature took one name, still works."""
    from common import load_tool

    parse = load_tool("eval_pref").parse_args
    base = ["--model", "M", "--data", "D.jsonl"]
    assert parse(base).shared_prefix is True
    assert parse(base + ["--no-shared-prefix"]).shared_prefix is False
    assert parse(base + ["--no-share-prefix"]).shared_prefix is False
