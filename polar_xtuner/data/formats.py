"""Other preference formats, turned into POLAR prompt/reference/chosen/rejected.

* ``ranked`` (UltraFeedback style): one prompt with three or more scored
  responses, ``{"prompt": ..., "responses": [{"response": ..., "score": 8.5},
  ...]}``. The best response becomes the reference, and every pair of the
  remaining responses with different scores becomes one record (the better
  one chosen), as the POLAR paper fine-tunes on A > B > C with A as the
  demonstration. Ties at the top are refused: the reference must be unique.
* ``policies`` (POLAR's own pre-training data, policy discrimination): one
  prompt with samples from several policies, ``{"prompt": ..., "samples":
  [{"policy": "name", "response": ...}, ...]}``. A triple takes a sample of a
  policy P as the reference, another sample of P as the chosen answer and a
  sample of another policy Q as the rejected one: the model learns to score
  answers from the reference's own policy higher. At most
  ``pairs_per_prompt`` triples per prompt are drawn, at random but
  deterministically from ``seed`` and the record's content.
* ``pairwise`` (HH-RLHF style, chosen/rejected without a reference): refused.
  POLAR scores against a reference and cannot be trained without one; using
  the chosen answer as its own reference would teach copying, not preference.
  Add a ``reference`` field, or supply three or more ranked responses.

Converters yield either records or :class:`RecordError`, one per produced
record or failed input, so the builder reports them like any other record.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Iterator

from polar_xtuner.records import RecordError, finite_number, join_contents, refuse_non_finite

FORMATS = ("polar", "ranked", "policies", "pairwise")
DEFAULT_PAIRS_PER_PROMPT = 4
# Up to this many candidate triples are shuffled exhaustively; above it,
# candidates are drawn at random (a prompt with hundreds of samples).
_EXHAUSTIVE = 10_000


def _text(x, where: str):
    if isinstance(x, (str, list)):
        return x
    raise RecordError(f"{where} must be a string or a list of messages", where.split("[")[0], "bad_type")


def from_ranked(obj) -> Iterator[dict]:
    """POLAR records from one ranked-responses object."""
    if not isinstance(obj, dict):
        raise RecordError("record must be a JSON object", None, "not_object")
    if "prompt" not in obj or "responses" not in obj:
        raise RecordError("ranked records need 'prompt' and 'responses'", "responses", "missing_field")
    responses = obj["responses"]
    if not isinstance(responses, list) or len(responses) < 3:
        raise RecordError("'responses' must list three or more scored responses (best one = reference)",
                          "responses", "too_few_responses")
    scored = []
    for i, r in enumerate(responses):
        if not isinstance(r, dict) or "response" not in r or "score" not in r:
            raise RecordError(f"'responses[{i}]' must be {{\"response\": ..., \"score\": number}}",
                              "responses", "bad_message")
        scored.append((finite_number(r["score"], f"responses[{i}].score", "responses"), i,
                       _text(r["response"], f"responses[{i}].response")))
    scored.sort(key=lambda t: (-t[0], t[1]))
    if scored[0][0] == scored[1][0]:
        raise RecordError("two responses share the top score; the reference must be the unique best",
                          "responses", "tied_reference")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "responses")}
    for k, v in extra.items():
        refuse_non_finite(v, k)
    ref = scored[0][2]
    rest = scored[1:]
    for a in range(len(rest)):
        for b in range(a + 1, len(rest)):
            if rest[a][0] > rest[b][0]:
                yield {"prompt": obj["prompt"], "reference": ref, "chosen": rest[a][2],
                       "rejected": rest[b][2], **extra}


def from_policies(obj, seed: int = 0, pairs_per_prompt: int = DEFAULT_PAIRS_PER_PROMPT) -> Iterator[dict]:
    """POLAR triples from one prompt's samples of several policies.

    Each output record is ``prompt``, ``reference`` and ``chosen`` (two
    different samples of policy ``policy``), ``rejected`` (a sample of
    ``rejected_policy``), plus the input's other keys.

    Raises:
        RecordError: The samples cannot form a triple (the reason says why).
    """
    if not isinstance(obj, dict):
        raise RecordError("record must be a JSON object", None, "not_object")
    if "prompt" not in obj or "samples" not in obj:
        raise RecordError("policies records need 'prompt' and 'samples'", "samples", "missing_field")
    samples = obj["samples"]
    if not isinstance(samples, list):
        raise RecordError("'samples' must be a list of {\"policy\": ..., \"response\": ...}", "samples", "bad_type")
    by_policy: dict[str, list] = {}
    for i, smp in enumerate(samples):
        if not isinstance(smp, dict) or not isinstance(smp.get("policy"), str) or not smp["policy"].strip() \
                or "response" not in smp:
            raise RecordError(f"'samples[{i}]' must be {{\"policy\": non-empty string, \"response\": ...}}",
                              "samples", "bad_sample")
        by_policy.setdefault(smp["policy"], []).append(_text(smp["response"], f"samples[{i}].response"))
    if len(by_policy) < 2:
        raise RecordError(f"'samples' come from {len(by_policy)} policy; a triple needs a second policy "
                          "for the rejected answer", "samples", "too_few_policies")
    anchors = [p for p, resp in by_policy.items() if len(resp) >= 2]
    if not anchors:
        raise RecordError("no policy has two samples; a triple needs two samples of one policy "
                          "(the reference and the chosen answer)", "samples", "no_repeated_policy")
    if not isinstance(pairs_per_prompt, int) or pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be a positive integer, got {pairs_per_prompt!r}")

    # Candidates, indexed without building them all: for each anchor policy P,
    # ordered (reference, chosen) pairs of P times the samples of the others.
    blocks = []
    total = 0
    for p in anchors:
        others = [(q, r) for q, resp in by_policy.items() if q != p for r in resp]
        n = len(by_policy[p])
        blocks.append((total, p, n, others))
        total += n * (n - 1) * len(others)

    def decode(idx):
        for start, p, n, others in reversed(blocks):
            if idx >= start:
                k = idx - start
                pair, other = divmod(k, len(others))
                ref, cho = divmod(pair, n - 1)
                cho += cho >= ref  # skip the reference itself
                return p, by_policy[p][ref], by_policy[p][cho], others[other]
        raise AssertionError(idx)

    # Seeded by the record's content: the same triples whatever the file order.
    digest = hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    rng = random.Random(f"{seed}:{digest}")
    if total <= _EXHAUSTIVE:
        order = list(range(total))
        rng.shuffle(order)
    else:
        order = (rng.randrange(total) for _ in range(50 * pairs_per_prompt))
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "samples")}
    for k, v in extra.items():
        refuse_non_finite(v, k)
    seen, made = set(), 0
    for idx in order:
        if made == pairs_per_prompt:
            break
        if idx in seen:
            continue
        seen.add(idx)
        p, ref, cho, (q, rej) = decode(idx)
        if join_contents(cho) == join_contents(rej):
            continue  # identical answers from two policies cannot be told apart
        made += 1
        yield {"prompt": obj["prompt"], "reference": ref, "chosen": cho, "rejected": rej,
               **extra, "policy": p, "rejected_policy": q}
    if made == 0:
        raise RecordError("every sample of the other policies is identical to the repeated policy's samples; "
                          "no triple can tell them apart", "samples", "no_distinct_triple")


def refuse_pairwise(obj) -> Iterator[dict]:
    raise RecordError(
        "pairwise data has no reference, and POLAR scores against one: add a 'reference' field "
        "(for example a gold answer) or give three or more ranked responses (--from ranked)",
        "reference", "no_reference",
    )
    yield  # pragma: no cover - makes this a generator like the others


CONVERTERS = {"ranked": from_ranked, "policies": from_policies, "pairwise": refuse_pairwise}
# Converters that take the builder's options (seed, pairs_per_prompt).
TAKES_OPTIONS = {"policies"}
