"""Benchmark formats read into groups by their real field layouts, the bad inputs refused, groups scored."""
import json
import os

import pytest
import torch

from polar_xtuner.errors import UserError
from polar_xtuner.eval.benchmarks import load_eval_records, load_references
from polar_xtuner.records import join_contents, response_values

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "benchmarks")


def asset(name):
    return os.path.join(ASSETS, name)


def _text(field):
    return join_contents(field)


def test_verifybench_rows_of_one_question_form_a_group():
    loaded = load_eval_records(asset("verifybench.jsonl"), "verifybench")
    assert [r.line for r in loaded.records] == [1, 3, 6]  # each group at its first row
    first = loaded.records[1].record
    assert _text(first["prompt"]) == "Which city is the capital of France?" and _text(first["reference"]) == "Paris"
    assert response_values(first) == ([1.0, 0.0, 0.0], "correct") and first["subset"] == "multiple_choice"
    assert response_values(loaded.records[2].record)[0] == [0.0, 1.0]


def test_ppe_maps_responses_scores_and_each_sets_ground_truth():
    mmlu = load_eval_records(asset("ppe_mmlu_pro.jsonl"), "ppe").records
    assert _text(mmlu[0].record["reference"]) == "B. B. green"  # the letter and the option it names
    assert response_values(mmlu[0].record) == ([1.0, 0.0, 1.0, 0.0], "correct")
    assert _text(mmlu[1].record["responses"][3]["response"]) == "The whale, (C)."  # response_4 <- scores[3]
    assert mmlu[1].record["subset"] == "biology"
    math = load_eval_records(asset("ppe_math.jsonl"), "ppe").records[0].record
    assert _text(math["reference"]) == "2 + 3 = \\boxed{5}." and math["subset"] == "Prealgebra"
    with pytest.raises(UserError, match=r"ppe_ifeval.jsonl:1: .*carry no reference; pass --references"):
        load_eval_records(asset("ppe_ifeval.jsonl"), "ppe")
    refs = load_references(asset("ppe_ifeval_references.jsonl"))
    ifeval = load_eval_records(asset("ppe_ifeval.jsonl"), "ppe", refs).records[0].record
    assert _text(ifeval["reference"]) == "Blue"


def test_rewardbench2_needs_references_and_gets_them_by_id():
    with pytest.raises(UserError, match="RewardBench 2 has no reference answers; pass --references"):
        load_eval_records(asset("rewardbench2.jsonl"), "rewardbench2")
    refs = load_references(asset("rewardbench2_references.jsonl"))
    recs = load_eval_records(asset("rewardbench2.jsonl"), "rewardbench2", refs).records
    assert [r.record["subset"] for r in recs] == ["Math", "Factuality", "Ties"]
    assert response_values(recs[2].record) == ([1.0, 1.0, 0.0, 0.0], "correct")  # chosen first, then rejected
    assert _text(recs[0].record["reference"]) == "7 x 6 = 42."


def test_missing_and_matching_references_are_refused_with_the_row(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"id": "42", "reference": "7 x 6 = 42."}) + "\n")
    with pytest.raises(UserError, match=r"rewardbench2.jsonl:2: no reference for id '7' in --references"):
        load_eval_records(asset("rewardbench2.jsonl"), "rewardbench2", load_references(str(refs)))
    # the chosen answer used as its own reference: the wrong conversion that inflates accuracy
    refs.write_text("".join(json.dumps({"id": i, "reference": r}) + "\n" for i, r in
                            [("42", "7 times 6 is 42."), ("7", "x"), ("tied:3", "y")]))
    with pytest.raises(UserError, match=r"rewardbench2.jsonl:1: the reference is identical to response 1"):
        load_eval_records(asset("rewardbench2.jsonl"), "rewardbench2", load_references(str(refs)))
    ok = load_eval_records(asset("rewardbench2.jsonl"), "rewardbench2", load_references(str(refs)),
                           allow_reference_match=True)
    assert len(ok.records) == 3 and ok.reference_matches == 1
    refs.write_text(json.dumps({"id": "42", "reference": "a"}) + "\n" + json.dumps({"id": "42", "reference": "b"}))
    with pytest.raises(UserError, match=r"refs.jsonl:2: id '42' appears twice"):
        load_references(str(refs))


def test_a_group_with_one_response_is_refused_and_a_bad_pair_skipped(tmp_path):
    data = tmp_path / "d.jsonl"
    pair = {"prompt": "p", "reference": "r", "chosen": "a", "rejected": "b"}
    one = {"prompt": "p", "reference": "r", "responses": [{"response": "a", "correct": True}]}
    data.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": "b"}) + "\n" + json.dumps(one) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:3: 'responses' holds 1 response\(s\); a group needs at least 2"):
        load_eval_records(str(data), "polar")
    no_reference = {k: v for k, v in one.items() if k != "reference"}
    no_reference["responses"] = one["responses"] * 2
    data.write_text(json.dumps(pair) + "\n" + json.dumps(no_reference) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'reference'"):
        load_eval_records(str(data), "polar")
    data.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": "b"}) + "\n")
    loaded = load_eval_records(str(data), "polar")
    assert len(loaded.records) == 1 and loaded.skipped == [(f"{data}:2", "'chosen' is identical to 'rejected'")]


@pytest.mark.parametrize("bad, reason", [
    ({"responses": "x"}, "must be a list"),
    ({"responses": [{"response": "a", "label": 1}, {"response": "b"}]}, r"exactly one of label, score, correct"),
    ({"responses": [{"response": "a", "label": 1}, {"response": "b", "correct": True}]}, "mix correct and label"),
    ({"responses": [{"response": "a", "correct": 1}, {"response": "b", "correct": False}]}, "must be true or false"),
    ({"responses": [{"response": "a", "score": float("nan")}, {"response": "b", "score": 1}]}, "finite number"),
    # as a pair refuses chosen == rejected; the same answer with the same value is a legal duplicate
    ({"responses": [{"response": "a", "correct": True}, {"response": "b", "correct": False},
                    {"response": [{"role": "assistant", "content": "a"}], "correct": False}]},
     r"'responses\[0\]' and 'responses\[2\]' are the same answer with different correct values"),
])
def test_group_rules_name_the_response(tmp_path, bad, reason):
    from polar_xtuner.records import RecordError, validate_group_record

    with pytest.raises(RecordError, match=reason):
        validate_group_record({"prompt": "p", "reference": "r", **bad})


def test_an_empty_response_is_an_answer_to_rank(tiny_model, tokenizer):
    from polar_xtuner.scoring import local as scoring
    from polar_xtuner.records import validate_group_record

    rec = validate_group_record({"prompt": "p", "reference": "r", "responses": [
        {"response": "", "correct": False}, {"response": "r", "correct": True}]})
    assert rec["responses"][0]["response"] == [{"role": "assistant", "content": ""}]
    whole = scoring.score_answers(tiny_model, tokenizer, [rec], 256, 64)
    shared = scoring.score_answers(tiny_model, tokenizer, [rec], 256, 64, shared_prefix=True)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(whole), rtol=1e-5, atol=1e-5)


def test_a_benchmark_file_of_another_format_is_named(tmp_path):
    with pytest.raises(UserError, match=r"verifybench.jsonl:1: no 'prompt' field, which --format ppe needs"):
        load_eval_records(asset("verifybench.jsonl"), "ppe")


def test_groups_score_the_same_shared_and_whole_and_in_parts(tiny_model, tokenizer, monkeypatch):
    from polar_xtuner.scoring import local as scoring

    recs = [r.record for r in load_eval_records(asset("groups.jsonl"), "polar").records]
    recs += [r.record for r in load_eval_records(asset("ppe_mmlu_pro.jsonl"), "ppe").records]
    whole = scoring.score_answers(tiny_model, tokenizer, recs, 256, 64, shared_prefix=False)
    shared = scoring.score_answers(tiny_model, tokenizer, recs, 256, 64, shared_prefix=True)
    assert [len(s) for s in whole] == [len(s) for s in shared] == [3, 2, 3, 4, 4]
    torch.testing.assert_close(torch.tensor([x for s in shared for x in s]),
                               torch.tensor([x for s in whole for x in s]), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(scoring, "MAX_ROW_TOKENS", 40)  # every group in parts, its prefix repeated
    parts = scoring.score_answers(tiny_model, tokenizer, recs, 256, 64, shared_prefix=True)
    torch.testing.assert_close(torch.tensor([x for s in parts for x in s]),
                               torch.tensor([x for s in whole for x in s]), rtol=1e-5, atol=1e-5)


def test_saved_scores_are_matched_to_records_by_digest(tmp_path):
    from polar_xtuner.eval.run import read_saved_scores

    loaded = load_eval_records(asset("groups.jsonl"), "polar")
    rows = [{"line": r.line, "digest": r.digest, "scores": [0.5] * len(r.record["responses"])}
            for r in loaded.records]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # order does not matter
    assert read_saved_scores(str(path), loaded) == [[0.5] * 3, [0.5] * 2, [0.5] * 3]
    rows[1]["digest"] = "0" * 16  # saved from other data, or read with another --format
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"no scores for .*groups.jsonl:2 \(record [0-9a-f]{16}\); save them from"):
        read_saved_scores(str(path), loaded)
    rows[1] = {**rows[1], "digest": loaded.records[1].digest, "scores": [0.5, float("inf")]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"s.jsonl:2: the scores must be finite numbers"):
        read_saved_scores(str(path), loaded)


def test_verifybench_questions_sharing_an_id_stay_apart(tmp_path):
    """The documented key is the id, the question and the reference: distinct questions are never merged."""
    rows = [{"question_id": 7, "question": q, "answer": "4", "completion": c, "gold_correct": ok}
            for q in ("What is 2 + 2?", "What is 8 / 2?") for c, ok in (("4", True), ("5", False))]
    path = tmp_path / "vb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_eval_records(str(path), "verifybench", allow_reference_match=True).records
    assert [_text(r.record["prompt"]) for r in recs] == ["What is 2 + 2?", "What is 8 / 2?"]
    assert [len(r.record["responses"]) for r in recs] == [2, 2]


def test_ppe_reads_every_response_field_whatever_its_index(tmp_path):
    row = {"prompt": "Pick blue.", "solution": "Blue", "scores": [True, False, False, False, True],
           **{f"response_{n}": f"answer {n}" for n in (1, 2, 3, 5)}}  # no response_4
    path = tmp_path / "ppe.jsonl"
    path.write_text(json.dumps(row) + "\n")
    rec = load_eval_records(str(path), "ppe").records[0].record
    assert [_text(r["response"]) for r in rec["responses"]] == ["answer 1", "answer 2", "answer 3", "answer 5"]
    assert response_values(rec) == ([1.0, 0.0, 0.0, 1.0], "correct")  # response_5 <- scores[4]


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    from polar_xtuner.eval.run import read_saved_scores

    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"id": "1", "reference": "a"}) + "\n" + json.dumps({"id": "1", "reference": "b"}) + "\n")
    with pytest.raises(UserError, match=r"refs.jsonl:1 and .*refs.jsonl:2: id '1' appears twice"):
        load_references(str(refs))
    loaded = load_eval_records(asset("groups.jsonl"), "polar")
    rows = [{"digest": r.digest, "scores": [0.5] * len(r.record["responses"])} for r in loaded.records]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[0]]))  # the same record, the same scores
    assert len(read_saved_scores(str(path), loaded)) == 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "scores": [0.1] * 3}]))
    with pytest.raises(UserError, match=r"s.jsonl:1 and .*s.jsonl:4: record [0-9a-f]{16} is saved twice with "
                                        r"different scores"):
        read_saved_scores(str(path), loaded)
