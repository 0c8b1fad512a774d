"""Tokenizing a huge field in windows at its kept end, with the ids the whole text would give.

Truncation keeps a few thousand tokens of a field, so a field of megabytes is
not tokenized whole: :func:`encode_kept` tokenizes windows that reach the kept
end until two agree. The notes below say why the ids are the whole text's.
"""

from __future__ import annotations

from typing import Callable


# Truncation keeps at most max_response_length tokens of a reference or
# candidate and (max_length - 4) // 2 of a prompt, so a 50 MB field need not be
# tokenized whole (that took over 100 bytes per character: 9 GB for one record).
# Such a field is tokenized in windows that reach its kept end (the head; the
# tail for the prompt and with cut_side="left"), and only the ids nearest that
# end are used. Why they are the whole text's ids:
#
# 1. Shared boundaries isolate. If the whole text's tokenization and a
#    window's both have a token boundary at character s, their ids on the kept
#    side of s are equal. BPE (lowest rank first, leftmost first among equals)
#    never merges across a boundary that stays, so the merges on the kept side
#    are chosen among kept-side pairs only, whatever lies beyond s. (Likewise
#    Unigram: the best path through s is the best path on each side; and
#    WordPiece, greedy from s.) The steps before the model (normalizer,
#    added-token split, pre-tokenizer regex, byte mapping) look a few
#    characters around a position, and BOS is at the start (the far end, or the
#    start of both when the head is kept), so the kept side's symbols are equal.
# 2. Two windows, cut at different places, are tokenized; they are accepted when
#    they agree on ``need + CLIP_MARGIN_TOKENS`` ids from the kept end, and the
#    ``need`` nearest it are used. That gives 64 boundaries beyond what is used
#    that two different cuts both produce. The ids used are wrong only if the
#    whole text has none of them: if its tokens are misaligned with both
#    windows' for 64 tokens in a row while the two windows' are aligned.
# 3. A cut's effect spreads token by token (a merge is decided by two
#    neighbouring tokens), dying out in ordinary text within a few tokens. It
#    can travel far only along a periodic stretch (100k spaces; "abab..."):
#    there leftmost-first grouping is anchored at the stretch's start and
#    carried along it, so cutting the start shifts the grouping up to the
#    stretch's end. Two cuts can shift it alike (seen with "ab" * 50000 and
#    tokens of up to 29 "ab"s) while the whole text is grouped differently:
#    the one way 2. can be fooled. So no cut is made inside a periodic stretch
#    (period <= CLIP_MAX_PERIOD chars) that runs CLIP_MAX_CONDUIT chars or more
#    toward the kept end: the cut moves out, past the stretch's far end, which
#    then lies inside the window, anchored as in the whole text. (A field that
#    is one long such stretch is tokenized whole: exact, memory as before.)
#    A shorter stretch is kept away from the ids used by the window size: the
#    ``need + CLIP_MARGIN_TOKENS`` ids at the kept end span at most that many
#    times the longest vocabulary entry in characters, and a window is at least
#    that plus CLIP_MAX_CONDUIT + CLIP_MAX_PERIOD + 2 entries long. For BPE,
#    cutting a stretch's end never regroups its head (leftmost first), so a
#    kept head needs no such move. Unless a cut was moved, the two windows'
#    cuts also differ by d = 1 (mod 840 = lcm(1..8)) characters, putting them
#    in different phases of any short period, so a regrouping tends to show as
#    disagreement (and the windows grow) rather than as agreement.
#
# tests/unit/encoding/test_windows.py compares the ids with whole-text tokenization on
# ASCII, CJK, emoji, runs of spaces, giant words and periodic stretches, at
# both kept ends, and checks the memory of the tools on a 20 MB record.
CLIP_MARGIN_TOKENS = 64
CLIP_MAX_PERIOD = 1024
CLIP_MAX_CONDUIT = 4096
CLIP_PHASE_MODULUS = 840


class ClippedIds(list):
    """Ids of a field tokenized in windows: the whole text's ids nearest its kept end.

    They are the first (kept head) or last (kept tail) ``len(self)`` ids of
    the whole text, one more than truncation keeps. The whole text has at
    least ``at_least`` ids (the windows' agreed ids less the margin); its
    exact length is not known.
    """

    def __init__(self, ids, at_least: int):
        super().__init__(ids)
        self.at_least = at_least


def window_base(need: int, longest: int) -> int:
    """Characters of a first window: room for the ids used, the margin and a short stretch."""
    return (need + CLIP_MARGIN_TOKENS + 2) * longest + CLIP_MAX_CONDUIT + CLIP_MAX_PERIOD


def next_window(w: int) -> int:
    """A window at least twice as long, longer by d = 1 (mod CLIP_PHASE_MODULUS)."""
    return w + w + (1 - w) % CLIP_PHASE_MODULUS


def _longest_run(limit: int, same) -> int:
    """Largest k <= limit such that ``same(k, s)`` holds over [k, k + s) for every step taken.

    Steps double from 64 while the slices match and halve when they do not, so
    a long periodic stretch costs O(log) bounded slice comparisons.
    """
    k, step = 0, 64
    while k < limit:
        s = min(step, limit - k)
        if same(k, s):
            k, step = k + s, min(step * 2, 1 << 20)  # bounded slices
        elif s == 1:
            break
        else:
            step = s // 2
    return max(k, 0)


def _run_forward(t: str, i: int, p: int, cap: int) -> int:
    """Largest k <= cap with t[j] == t[j + p] for every j in [i, i + k)."""
    return _longest_run(min(cap, len(t) - p - i), lambda k, s: t[i + k:i + k + s] == t[i + p + k:i + p + k + s])


def _run_backward(t: str, i: int, p: int, cap: int) -> int:
    """Largest k <= cap with t[j] == t[j - p] for every j in [i - k, i)."""
    return _longest_run(min(cap, i - p), lambda k, s: t[i - k - s:i - k] == t[i - p - k - s:i - p - k])


def cut_outside_stretches(t: str, c: int, tail: bool) -> int:
    """Cut position c, moved (away from the kept end) out of any long periodic stretch.

    ``tail``: the window is ``t[c:]``, else ``t[:c]``. A stretch counts when it
    has a period of at most CLIP_MAX_PERIOD characters and runs at least
    CLIP_MAX_CONDUIT characters from c toward the kept end.
    """
    n, r = len(t), CLIP_MAX_CONDUIT
    moved = True
    while moved and 0 < c < n:
        moved = False
        for p in range(1, CLIP_MAX_PERIOD + 1):
            if tail and c + p + r <= n and t[c:c + r] == t[c + p:c + p + r]:
                # the stretch's start: t[j] == t[j + p] from there to c
                c = max(c - _run_backward(t, c + p, p, c) - CLIP_MAX_PERIOD, 0)
                moved = True
                break
            if not tail and c - p - r >= 0 and t[c - r:c] == t[c - r - p:c - p]:
                c = min(c + _run_forward(t, c - p, p, n) + CLIP_MAX_PERIOD, n)
                moved = True
                break
    return c


def common_prefix(a: list[int], b: list[int]) -> int:
    n, k = min(len(a), len(b)), 0
    while k < n:
        j = min(k + 4096, n)
        if a[k:j] != b[k:j]:  # compare in C, then find the first difference
            return next(i for i in range(k, j) if a[i] != b[i])
        k = j
    return n


def common_suffix(a: list[int], b: list[int]) -> int:
    n, k, la, lb = min(len(a), len(b)), 0, len(a), len(b)
    while k < n:
        j = min(k + 4096, n)
        if a[la - j:la - k] != b[lb - j:lb - k]:
            return next(i for i in range(k, j) if a[la - 1 - i] != b[lb - 1 - i])
        k = j
    return n


def encode_kept(encode: Callable[[list[str]], list[list[int]]], texts: list[str], keep: int, tail: bool,
                longest_token: Callable[[], int], head_anchored: bool) -> list[list[int]]:
    """Ids of texts of which at most ``keep`` tokens (the last ones if ``tail``) are used.

    Texts up to two first windows long go through one batched call of
    ``encode``; a longer one is tokenized in windows (:func:`encode_clipped`).

    Args:
        encode: The tokenizer's batched encode (special tokens added).
        texts: The texts.
        keep: Tokens truncation keeps of each.
        tail: Whether the kept end is the tail (else the head).
        longest_token: Characters of the longest vocabulary entry (called only when needed).
        head_anchored: A BPE model, whose grouping is anchored at a stretch's start: a kept head needs no
            cut moved (note 3).
    """
    need = keep + 1  # one more than is kept: the ids show the field is over the limit
    out: list = [None] * len(texts)
    whole = None
    if any(len(t) > 2 * need for t in texts):  # else none is over `whole`: skip the vocabulary scan
        whole = next_window(window_base(need, longest_token()))
    batch = [i for i, t in enumerate(texts) if whole is None or len(t) <= whole]
    for i, ids in zip(batch, encode([texts[i] for i in batch])):
        out[i] = ids
    for i, t in enumerate(texts):
        if out[i] is None:
            out[i] = encode_clipped(encode, t, need, tail, longest_token(), head_anchored)
    return out


def encode_clipped(encode: Callable[[list[str]], list[list[int]]], text: str, need: int, tail: bool,
                   longest: int, head_anchored: bool) -> list[int]:
    """``need`` ids of ``text`` at its kept end (the tail if ``tail``), from windows.

    Windows of growing size that reach the kept end are tokenized until two
    consecutive ones agree on ``need + CLIP_MARGIN_TOKENS`` ids counted from
    that end; the ``need`` nearest it come back as :class:`ClippedIds`. A
    window that would cover the text is not made: the whole text is
    tokenized and its ids (a list) come back. Why the ids are the whole
    text's: the notes above.
    """
    n = len(text)
    w, prev = window_base(need, longest), None
    while True:
        if tail or not head_anchored:
            c = cut_outside_stretches(text, n - w if tail else w, tail)
            w = n - c if tail else c
        if w >= n:
            return encode([text])[0]
        cur = encode([text[n - w:] if tail else text[:w]])[0]
        if prev is not None:
            agree = common_suffix(prev, cur) if tail else common_prefix(prev, cur)
            if agree >= need + CLIP_MARGIN_TOKENS:
                ids = cur[len(cur) - need:] if tail else cur[:need]
                return ClippedIds(ids, at_least=agree - CLIP_MARGIN_TOKENS)
        prev, w = cur, next_window(w)
