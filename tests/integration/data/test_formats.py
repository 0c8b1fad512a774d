"""`build_dataset.py --from policies` (policy-discrimination triples) and a tiny continued pre-training."""
import json
import os

import pytest

from common import REPO, copy_config, load_tool, run_tool
from polar_xtuner.demo.data import generate_policy_samples, write_jsonl

pytestmark = pytest.mark.integration  # every test runs tools/build_dataset.py (or xtuner train) in a subprocess

EXAMPLE = os.path.join(REPO, "data", "examples", "policies.jsonl")


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _build(src, out, *extra):
    return run_tool("python", "tools/build_dataset.py", str(src), "--from", "policies", "-o", str(out), *extra)


def _text(field):
    return field[0]["content"]


def test_triples_take_reference_and_chosen_from_one_policy(tmp_path):
    proc = _build(EXAMPLE, tmp_path / "o", "--pairs-per-prompt", "3")
    assert proc.returncode == 0, proc.stderr
    recs = _lines(tmp_path / "o" / "train.jsonl")
    src = _lines(EXAMPLE)
    assert len(recs) == 9
    for rec in recs:
        samples = next(s["samples"] for s in src if _text(rec["prompt"]) in json.dumps(s["prompt"]))
        policy_of = {}
        for smp in samples:
            policy_of.setdefault(smp["response"], set()).add(smp["policy"])
        assert rec["policy"] in policy_of[_text(rec["reference"])]
        assert rec["policy"] in policy_of[_text(rec["chosen"])]
        assert rec["rejected_policy"] in policy_of[_text(rec["rejected"])]
        assert rec["rejected_policy"] != rec["policy"] and rec["reference"] != rec["chosen"]
        assert rec["source"] == "example-policies"  # the input's other keys are kept
    report = json.load(open(tmp_path / "o" / "report.json"))["policy_triples"]
    assert report["pairs_per_prompt"] == 3 and report["triples_per_prompt_histogram"] == {"3": 3}
    assert sum(v["reference_and_chosen"] for v in report["per_policy"].values()) == 9
    assert sum(report["per_prompt"].values()) == 9 and f"{EXAMPLE}:2" in report["per_prompt"]
    assert "triples from 3 prompt(s)" in proc.stdout


def test_deterministic_under_seed_and_independent_of_file_order(tmp_path):
    src = list(generate_policy_samples(30, 5, samples_per_policy=3))
    write_jsonl(str(tmp_path / "a.jsonl"), src)
    write_jsonl(str(tmp_path / "b.jsonl"), src[::-1])
    outs = {}
    for name, file, seed in [("a", "a.jsonl", "0"), ("a2", "a.jsonl", "0"), ("rev", "b.jsonl", "0"),
                             ("seed1", "a.jsonl", "1")]:
        assert _build(tmp_path / file, tmp_path / name, "--seed", seed).returncode == 0
        outs[name] = _lines(tmp_path / name / "train.jsonl")
    assert outs["a"] == outs["a2"]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, outs["a"])) == sorted(map(key, outs["rev"]))
    assert outs["a"] != outs["seed1"]
    assert len(outs["a"]) == 30 * 4  # the default cap: 4 per prompt, each prompt has far more


def test_the_cap_and_small_prompts(tmp_path):
    # 2 samples of A, 1 of B: exactly 2 triples exist (either A as reference)
    rec = {"prompt": "q", "samples": [{"policy": "A", "response": "a1"}, {"policy": "A", "response": "a2"},
                                      {"policy": "B", "response": "b1"}]}
    write_jsonl(str(tmp_path / "s.jsonl"), [rec])
    assert _build(tmp_path / "s.jsonl", tmp_path / "o", "--pairs-per-prompt", "10").returncode == 0
    got = {(_text(r["reference"]), _text(r["chosen"]), _text(r["rejected"])) for r in _lines(tmp_path / "o" / "train.jsonl")}
    assert got == {("a1", "a2", "b1"), ("a2", "a1", "b1")}
    assert _build(tmp_path / "s.jsonl", tmp_path / "o1", "--pairs-per-prompt", "1").returncode == 0
    assert len(_lines(tmp_path / "o1" / "train.jsonl")) == 1


def test_records_that_cannot_form_a_triple_are_rejected_with_the_reason(tmp_path):
    good = {"prompt": "q", "samples": [{"policy": "A", "response": "a1"}, {"policy": "A", "response": "a2"},
                                       {"policy": "B", "response": "b1"}]}
    bad = [
        {"prompt": "q", "samples": [{"policy": "A", "response": "a1"}, {"policy": "A", "response": "a2"}]},
        {"prompt": "q", "samples": [{"policy": "A", "response": "a1"}, {"policy": "B", "response": "b1"}]},
        {"prompt": "q", "samples": [{"policy": "A", "response": "a1"}, {"response": "x"}]},
        {"prompt": "q", "samples": "a1"},
        {"prompt": "q"},
        {"prompt": "q", "samples": [{"policy": "A", "response": "same"}, {"policy": "A", "response": "same"},
                                    {"policy": "B", "response": "same"}]},
    ]
    lines = [json.dumps(good)] + [json.dumps(b) for b in bad] + ["{not json"]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    proc = _build(tmp_path / "mixed.jsonl", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    rejected = {r["line"]: r for r in _lines(tmp_path / "o" / "rejected.jsonl")}
    assert sorted(rejected) == [2, 3, 4, 5, 6, 7, 8]
    assert "second policy" in rejected[2]["reason"] and "two samples of one policy" in rejected[3]["reason"]
    assert "samples[1]" in rejected[4]["reason"] and rejected[5]["field"] == "samples"
    assert "'samples'" in rejected[6]["reason"]
    assert "identical" in rejected[7]["reason"] and rejected[7]["field"] == "samples"
    assert "invalid JSON" in rejected[8]["reason"]
    report = json.load(open(tmp_path / "o" / "report.json"))
    assert report["kept"] == 2 and report["rejected"] == 7


def test_option_errors_exit_2(tmp_path):
    proc = run_tool("python", "tools/build_dataset.py", EXAMPLE, "--pairs-per-prompt", "2", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--from policies only" in proc.stderr
    proc = _build(EXAMPLE, tmp_path / "o", "--pairs-per-prompt", "0")
    assert proc.returncode == 2 and "at least 1" in proc.stderr


@pytest.mark.slow  # trains the tiny model: ~30 s measured
def test_tiny_continued_pretraining_tells_two_policies_apart(tmp_path, tiny_dir, capsys):
    """Trained on triples of the toy policies, held-out accuracy >= 0.90 (chance 0.5).

    The data tools run through their main() here and the held-out accuracy is the
    training's own PolarEvalHook on the val file (equal to eval_pref's on the converted
    model: tests/e2e/test_demo.py and test_integration.py); training is `xtuner train`.
    """
    import re

    write_jsonl(str(tmp_path / "train_src.jsonl"), generate_policy_samples(1200, 0))
    write_jsonl(str(tmp_path / "val_src.jsonl"), generate_policy_samples(100, 1))
    build = load_tool("build_dataset").main
    assert build([str(tmp_path / "train_src.jsonl"), "--from", "policies", "-o", str(tmp_path / "train"),
                  "--pairs-per-prompt", "2"]) == 0
    assert build([str(tmp_path / "val_src.jsonl"), "--from", "policies", "-o", str(tmp_path / "val"),
                  "--pairs-per-prompt", "2", "--seed", "1"]) == 0
    train, val = str(tmp_path / "train" / "train.jsonl"), str(tmp_path / "val" / "train.jsonl")
    assert {r["policy"] for r in _lines(val)} == {"hedger", "asserter", "explainer"}

    assert load_tool("eval_pref").main(["--model", tiny_dir, "--data", val,
                                        "--out", str(tmp_path / "untrained.json")]) == 0, capsys.readouterr().err
    cfg = copy_config(str(tmp_path), "polar_pdl_tiny.py", tiny_dir, train, max_epochs=1, val_files=val,
                      data_cache_dir=None)
    work = str(tmp_path / "work")
    proc = run_tool("xtuner", "train", cfg, "--work-dir", work, timeout=600)
    log = proc.stdout + proc.stderr
    assert os.path.isfile(os.path.join(work, "last_checkpoint")), log[-3000:]
    before = json.load(open(tmp_path / "untrained.json"))["accuracy"]
    during = re.findall(r"PolarEvalHook: iter (\d+) val/pref_accuracy ([0-9.]+) margin [-0-9.]+ \(n=(\d+)\)", log)
    total = re.findall(r"Iter\(train\) \[\s*\d+/(\d+)\]", log)[-1]
    assert during and during[-1][0] == total and int(during[-1][2]) == len(_lines(val)), during
    after = float(during[-1][1])
    assert before < 0.75 and after >= 0.90, (before, after)


def test_val_split_keeps_each_prompts_triples_together(tmp_path):
    write_jsonl(str(tmp_path / "s.jsonl"), generate_policy_samples(60, 2))
    assert _build(tmp_path / "s.jsonl", tmp_path / "o", "--val-ratio", "0.3").returncode == 0
    train = {json.dumps(r["prompt"]) + r["id"] for r in _lines(tmp_path / "o" / "train.jsonl")}
    val = {json.dumps(r["prompt"]) + r["id"] for r in _lines(tmp_path / "o" / "val.jsonl")}
    assert train and val and not train & val
