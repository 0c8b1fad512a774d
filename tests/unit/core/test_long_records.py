"""Huge fields: tokenized in windows at their kept end, same ids as whole-text tokenization, bounded memory.

The reference everywhere is the encoder with windowing switched off
(:class:`Whole`): the ids must be bit-identical for every record.
"""
import json
import random

import pytest

from common import run_tool
from polar_xtuner.data.check import LengthMeter
from polar_xtuner.encoding import windows as token_windows
from polar_xtuner.encoding import PolarEncoder, pair_items
from polar_xtuner.encoding.windows import ClippedIds
from polar_xtuner.records import validate_record


class Whole(PolarEncoder):
    """The encoder as it was: every field tokenized whole."""

    def _encode_kept(self, texts, keep, tail):
        return self._encode(texts)


WORDS = ("the quick brown fox jumps over a lazy dog meeting children umbrella carefully "
         "Definitely assistant description , . ! ? ( ) 42 3.14 café naïve").split()
CJK = "你好世界中文字符模型奖励参考回答问题。，！"
EMOJI = ["😀", "🎉", "👍🏽", "👩‍💻", "🇨🇳", "e\u0301", "\u00a0", "𝔘", "\u200b"]
SPECIALS = ["<s>", "</s>", "<|reward|>", "[UNUSED_TOKEN_130]"]


def _text(kind: str, n: int, rng: random.Random) -> str:
    """About n characters of one kind of text."""
    if kind == "ascii":
        return " ".join(rng.choices(WORDS, k=n // 6)) + "\n"
    if kind == "cjk":
        return "".join(rng.choices(CJK, k=n))
    if kind == "emoji":
        return "".join(rng.choices(EMOJI + [" ", "a"], k=n // 2))
    if kind == "spaces":  # long runs of spaces inside, and at both ends
        parts = [" " * rng.randrange(20_000, 60_000)]
        while sum(map(len, parts)) < n or len(parts) == 1:
            parts += [" ".join(rng.choices(WORDS, k=50)), " " * rng.randrange(1, 30_000)]
        return "".join(parts)
    if kind == "giant_word":  # no space at all, not periodic
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyzéß0123456789_", k=n))
    if kind == "specials":  # special-token strings land near the window cuts too
        return "".join(rng.choice(SPECIALS) if rng.random() < 0.2 else rng.choice(WORDS) + " "
                       for _ in range(n // 6))
    if kind == "periodic":
        unit = rng.choice(["a", "ab", " abc", "=\n", "-=", "你"])
        return unit * (n // len(unit))
    raise ValueError(kind)


KINDS = ("ascii", "cjk", "emoji", "spaces", "giant_word", "specials", "periodic")


def _records(seed: int, n_chars: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for _ in range(count):
        rec = {f: _text(rng.choice(KINDS), rng.randrange(n_chars // 2, n_chars), rng)
               for f in ("prompt", "reference", "chosen", "rejected")}
        # short fields too: windowing is per field, a short one sits in the same batch
        rec[rng.choice(["reference", "chosen", "rejected"])] = _text(rng.choice(KINDS), 200, rng)
        recs.append(validate_record(rec))
    return recs


def _assert_same_ids(tok, recs, max_length, max_response_length, cut_side):
    enc = PolarEncoder(tok, max_length, max_response_length, cut_side=cut_side)
    ref = Whole(tok, max_length, max_response_length, cut_side=cut_side)
    fields = enc.encode_fields(pair_items(recs))
    clipped = sum(isinstance(x, ClippedIds) for ids in fields for x in ids)
    assert enc.encode_pairs(recs, fields) == ref.encode_pairs(recs)
    items = pair_items(recs)
    assert enc.serving_texts(items) == ref.serving_texts(items)
    return clipped


@pytest.mark.parametrize("cut_side", ["right", "left"])
@pytest.mark.parametrize("seed", range(4))
def test_ids_equal_whole_tokenization(tokenizer, seed, cut_side):
    recs = _records(seed, 120_000, 3)
    clipped = _assert_same_ids(tokenizer, recs, 300, 60, cut_side)
    assert clipped >= 4  # windowing really happened (periodic tails are tokenized whole)


def test_ids_equal_at_the_published_lengths(tokenizer):
    rng = random.Random(7)
    rec = validate_record({f: _text(k, 400_000, rng) for f, k in
                           zip(("prompt", "reference", "chosen", "rejected"), ("ascii", "cjk", "emoji", "specials"))})
    for cut_side in ("right", "left"):
        assert _assert_same_ids(tokenizer, [rec], 16384, 4096, cut_side) == 4


def test_ids_equal_with_a_tokenizer_that_groups_runs():
    # A vocabulary with long run tokens ("ab" * 29, 39 spaces): the grouping
    # of a long periodic stretch is anchored at its start, the case where two
    # windows can agree with each other and both be wrong.
    from polar_xtuner.demo.data import corpus_for_tokenizer
    from polar_xtuner.demo.tiny_model import build_tokenizer

    corpus = list(corpus_for_tokenizer()) + 20 * (
        [" " * n + "x" for n in range(1, 40)] + ["a" * n for n in range(1, 40)] + ["ab" * n for n in range(1, 30)])
    tok = build_tokenizer(corpus)
    assert max(len(t) for t in tok.get_vocab()) >= 58
    texts = ["ab" * 50_000, "ab" * 50_001 + "a", "x" + " " * 100_000, "a" * 100_003, "ab" * 40_000 + " end",
             "start " + "ab" * 40_000, "words here " * 2_000 + "ab" * 30_000 + " and the tail " * 1_000]
    recs = [validate_record({"prompt": t, "reference": t, "chosen": t[::-1], "rejected": t + " no"}) for t in texts]
    for cut_side in ("right", "left"):
        _assert_same_ids(tok, recs, 300, 60, cut_side)

    # Without moving cuts out of periodic stretches, the two-window check alone
    # is fooled on such a tail (why token_windows.py has the rule).
    fooled = 0
    enc = PolarEncoder(tok, 300, 60)
    original = token_windows.cut_outside_stretches
    try:
        token_windows.cut_outside_stretches = lambda t, c, tail: c
        for n in range(50_000, 50_004):
            text = "ab" * n
            clipped = token_windows.encode_clipped(enc._encode, text, 149, True, enc._longest_token(),
                                                   enc._head_anchored)
            fooled += clipped != tok.encode(text)[-149:]
    finally:
        token_windows.cut_outside_stretches = original
    assert fooled


def test_length_report_counts_clipped_fields_as_truncated(tokenizer):
    recs = _records(11, 120_000, 4) + [validate_record({"prompt": "Q?", "reference": "R.", "chosen": "A.",
                                                        "rejected": "B."})]
    meter, whole = LengthMeter(tokenizer, 300, 60, 600), LengthMeter(tokenizer, 300, 60, 600)
    whole.enc = Whole(tokenizer, 300, 60)
    reasons = meter.measure(recs)
    assert reasons[-1] is None and any("at least" in r for r in reasons[:-1])
    assert [r is None for r in reasons] == [r is None for r in whole.measure(recs)]
    got, want = meter.report(), whole.report()
    assert got.keys() == want.keys() and got["tokens"].keys() == want["tokens"].keys()
    assert got["truncated"] == want["truncated"]
    assert got["over_max_packed_length"] == want["over_max_packed_length"]
    assert got["tokens"]["pair"] == want["tokens"]["pair"]
    for f in LengthMeter.FIELDS:  # a clipped field's length is a lower bound
        assert all(a <= b for a, b in zip(meter.lengths[f], whole.lengths[f]))


# Peak memory of the tools on the ~20 MB record below (tiny tokenizer, 2-core
# CPU, measured once with the windows switched off): build_dataset --tokenizer
# 3354 MB whole-text against 896 MB with windows (734 MB on a small record);
# eval_pref 3431 MB against 1023 MB (976-1008 MB on a small record). Whole-text
# tokenization adds ~2.6 GB; the bound allows 600 MB over the small record.
PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:]); "
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
EXTRA_MB = 600


def _peak_mb(*args) -> float:
    proc = run_tool("python", "-c", PEAK, "python", *args, timeout=600)
    rc, kb = proc.stdout.split()
    assert rc == "0", proc.stderr
    return int(kb) / 1024


@pytest.fixture(scope="module")
def record_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    rng = random.Random(0)
    words = WORDS + list(CJK) + EMOJI
    big = {f: " ".join(rng.choices(words, k=1_000_000)) for f in ("prompt", "reference", "chosen", "rejected")}
    small = {f: " ".join(rng.choices(words, k=100)) for f in big}
    paths = {}
    for name, rec in (("big", big), ("small", small)):
        paths[name] = str(tmp / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    assert sum(len(v.encode()) for v in big.values()) > 18_000_000
    return paths


@pytest.mark.integration  # runs a repository tool or script in a subprocess
@pytest.mark.parametrize("tool", ["build_dataset", "eval_pref"])
def test_peak_memory_is_bounded_by_the_lengths(tiny_dir, record_files, tmp_path, tool):
    def run(name):
        if tool == "build_dataset":
            return _peak_mb("tools/build_dataset.py", record_files[name], "-o", str(tmp_path / name),
                            "--tokenizer", tiny_dir)
        return _peak_mb("tools/eval_pref.py", "--model", tiny_dir, "--data", record_files[name],
                        "--max-length", "2048", "--max-response-length", "512")

    small, big = run("small"), run("big")
    assert big - small < EXTRA_MB, f"{tool}: {big:.0f} MB on a 20 MB record, {small:.0f} MB on a small one"
