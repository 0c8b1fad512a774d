"""Other preference formats, turned into POLAR prompt/reference/chosen/rejected.

* ``ranked`` (UltraFeedback style): one prompt with three or more scored
  responses, ``{"prompt": ..., "responses": [{"response": ..., "score": 8.5},
  ...]}``. The best response becomes the reference, and every pair of the
  remaining responses with different scores becomes one record (the better
  one chosen), as the POLAR paper fine-tunes on A > B > C with A as the
  demonstration. Ties at the top are refused: the reference must be unique.
* ``pairwise`` (HH-RLHF style, chosen/rejected without a reference): refused.
  POLAR scores against a reference and cannot be trained without one; using
  the chosen answer as its own reference would teach copying, not preference.
  Add a ``reference`` field, or supply three or more ranked responses.

Converters yield either records or :class:`RecordError`, one per produced
record or failed input, so the builder reports them like any other record.
"""

from __future__ import annotations

from typing import Iterator

from .schema import RecordError

FORMATS = ("polar", "ranked", "pairwise")


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
        if not isinstance(r, dict) or "response" not in r or not isinstance(r.get("score"), (int, float)):
            raise RecordError(f"'responses[{i}]' must be {{\"response\": ..., \"score\": number}}",
                              "responses", "bad_message")
        scored.append((float(r["score"]), i, _text(r["response"], f"responses[{i}].response")))
    scored.sort(key=lambda t: (-t[0], t[1]))
    if scored[0][0] == scored[1][0]:
        raise RecordError("two responses share the top score; the reference must be the unique best",
                          "responses", "tied_reference")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "responses")}
    ref = scored[0][2]
    rest = scored[1:]
    for a in range(len(rest)):
        for b in range(a + 1, len(rest)):
            if rest[a][0] > rest[b][0]:
                yield {"prompt": obj["prompt"], "reference": ref, "chosen": rest[a][2],
                       "rejected": rest[b][2], **extra}


def refuse_pairwise(obj) -> Iterator[dict]:
    raise RecordError(
        "pairwise data has no reference, and POLAR scores against one: add a 'reference' field "
        "(for example a gold answer) or give three or more ranked responses (--from ranked)",
        "reference", "no_reference",
    )
    yield  # pragma: no cover - makes this a generator like the others


CONVERTERS = {"ranked": from_ranked, "pairwise": refuse_pairwise}
