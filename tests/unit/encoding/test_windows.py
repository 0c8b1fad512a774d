"""polar_xtuner/encoding/windows.py: huge fields tokenized in windows at their kept end, the ids of whole-text tokenization.

The reference everywhere is the encoder with windowing switched off
(:class:`Whole`): the ids must be bit-identical for every record.
"""
import random

import pytest

from polar_xtuner.data.check import LengthMeter
from polar_xtuner.encoding import windows as token_windows
from polar_xtuner.encoding import PolarEncoder, pair_items
from polar_xtuner.encoding.windows import ClippedIds
from polar_xtuner.records import validate_record
from samples import long_records, random_text


# Whole-text ids per (tokenizer, texts), the tokenizer held so that its id stays its own: each
# reference tokenization is the same for both cut sides and for pairs and serving texts alike,
# and the 400 000-character fields take seconds to tokenize whole.
_WHOLE_IDS = {}


@pytest.fixture(autouse=True, scope="module")
def _forget_whole_ids():
    yield
    _WHOLE_IDS.clear()


class Whole(PolarEncoder):
    """The encoder as it was: every field tokenized whole."""

    def _encode_kept(self, texts, keep, tail):
        key = (id(self.tokenizer), tuple(texts))
        if key not in _WHOLE_IDS:
            _WHOLE_IDS[key] = (self.tokenizer, self._encode(texts))
        return [list(ids) for ids in _WHOLE_IDS[key][1]]  # copies: callers may cut them


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
    recs = long_records(seed, 120_000, 3)
    clipped = _assert_same_ids(tokenizer, recs, 300, 60, cut_side)
    assert clipped >= 4  # windowing really happened (periodic tails are tokenized whole)


def test_ids_equal_at_the_published_lengths(tokenizer):
    rng = random.Random(7)
    rec = validate_record({f: random_text(k, 400_000, rng) for f, k in
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
    recs = long_records(11, 120_000, 4) + [validate_record({"prompt": "Q?", "reference": "R.", "chosen": "A.",
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


