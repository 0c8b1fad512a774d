"""Scores, padding sides, and the preference report."""
import pytest
import torch

from polar_xtuner.demo.data import generate
from polar_xtuner.eval.report import preference_report
from polar_xtuner.scoring.local import score_ids, score_records


def test_left_and_right_padding_give_equal_scores(tiny_model, tokenizer):
    recs = list(generate(12, 3))
    left = score_records(tiny_model, tokenizer, recs, 512, 128, batch_size=8, padding_side="left")
    right = score_records(tiny_model, tokenizer, recs, 512, 128, batch_size=8, padding_side="right")
    single = score_records(tiny_model, tokenizer, recs, 512, 128, batch_size=1)
    flat = lambda s: torch.tensor(s).flatten()  # noqa: E731
    assert torch.allclose(flat(left), flat(right), atol=1e-5)
    assert torch.allclose(flat(left), flat(single), atol=1e-5)


def test_scores_match_the_hf_forward(tiny_model, tokenizer):
    from polar_xtuner.encoding import PolarEncoder

    rec = list(generate(1, 5))
    ids = PolarEncoder(tokenizer, 512, 128).encode_pairs(rec)[0]["chosen_ids"]
    ours = score_ids(tiny_model, [ids], tokenizer.pad_token_id)[0]
    with torch.no_grad():
        t = torch.tensor([ids])
        hf = tiny_model(input_ids=t, attention_mask=torch.ones_like(t))[0].item()
    assert ours == pytest.approx(hf, abs=1e-5)


def test_report_numbers_on_a_hand_computed_case():
    scores = [(2.0, 1.0), (0.5, 1.5), (1.0, 1.0), (3.0, 0.0)]
    recs = [{"category": "a"}, {"category": "a"}, {"category": "b"}, {"category": "b"}]
    r = preference_report(scores, recs, n_bootstrap=200)
    assert r["n"] == 4 and r["ties"] == 1
    assert r["accuracy"] == pytest.approx(0.5)  # ties do not count as wins
    assert r["margin"]["mean"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert r["margin"]["q50"] == pytest.approx(0.5)  # median of -1, 0, 1, 3
    got = {k: {f: v[f] for f in ("accuracy", "n", "ties")} for k, v in r["by_category"].items()}
    assert got == {"a": {"accuracy": 0.5, "n": 2, "ties": 0}, "b": {"accuracy": 0.5, "n": 2, "ties": 1}}
    lo, hi = r["accuracy_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_encoding_settings_file(tmp_path):
    from polar_xtuner.encoding import ENCODING_FILE, EncodingSettings

    assert EncodingSettings.from_model_dir(str(tmp_path)).source == "defaults"
    assert EncodingSettings.from_model_dir(str(tmp_path)).max_length == 16384
    EncodingSettings(2048, 256, 7).save(str(tmp_path))
    got = EncodingSettings.from_model_dir(str(tmp_path))
    assert (got.max_length, got.max_response_length, got.reward_token_id) == (2048, 256, 7)
    assert got.override(max_length=512).max_length == 512 and got.override().source == got.source
    for bad in ('{"max_length": "2048", "max_response_length": 256}', '{"max_length": true}', "[1]", "{"):
        (tmp_path / ENCODING_FILE).write_text(bad)
        with pytest.raises(ValueError, match=ENCODING_FILE):
            EncodingSettings.from_model_dir(str(tmp_path))


@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_the_plot_is_written_in_the_format_its_extension_names(ext, magic, tmp_path):
    from polar_xtuner.eval.plot import plot_scores
    from polar_xtuner.outputs import atomic_file

    path = tmp_path / f"scores{ext}"
    with atomic_file(str(path)) as tmp:  # as eval_pref writes it: the temporary name keeps the extension
        plot_scores([(1.0, 0.5), (0.2, 0.4), (0.9, -0.3)], tmp)
    assert path.read_bytes().startswith(magic)


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


def test_an_empty_answer_is_one_whether_a_string_or_messages(tiny_model, tokenizer):
    from polar_xtuner.records import validate_group_record

    base = {"prompt": "q", "reference": "r"}
    as_text = validate_group_record({**base, "responses": [{"response": "", "correct": False},
                                                           {"response": "r", "correct": True}]})
    as_messages = validate_group_record({**base, "responses": [
        {"response": [{"role": "assistant", "content": ""}], "correct": False}, {"response": "r", "correct": True}]})
    assert as_text["responses"] == as_messages["responses"]
