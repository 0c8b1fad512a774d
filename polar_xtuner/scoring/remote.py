"""Evaluation on a served model: answer scores through the remote client, and the served dtype's check."""

from __future__ import annotations

import json
import os

from polar_xtuner.constants import DEFAULT_MAX_LENGTH, DEFAULT_MAX_RESPONSE_LENGTH
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.records import record_answers
from polar_xtuner.scoring.client import RemoteScorer
from polar_xtuner.scoring.fleet import group_key


def check_served_dtype(scorer: RemoteScorer, model_dir: str) -> str:
    """Compare the served dtype with the model directory's; return a one-line note.

    A model trained and converted in fp32 but served in float16 scores
    differently (vLLM downcasts fp32 weights to float16 unless told
    ``--dtype float32``); the caller prints the note.
    """
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            saved = str(json.load(f).get("torch_dtype") or "")
    except (OSError, ValueError):
        saved = ""
    served = scorer.served_dtype()
    if served is None:
        return (f"note: the server does not report its dtype; serve with --dtype {saved or 'MODEL_DTYPE'} "
                f"(tools/serve.sh passes the model's) to score as the model was saved")
    if saved and served != saved:
        return (f"warning: the server computes in {served} but {model_dir} was saved in {saved}; scores "
                f"will differ from local ones (restart it with --dtype {saved})")
    return f"served dtype {served} matches the model's"


def score_answers_remote(scorer: RemoteScorer, tokenizer, records, max_length=DEFAULT_MAX_LENGTH,
                         max_response_length=DEFAULT_MAX_RESPONSE_LENGTH) -> list[list[float]]:
    """Each validated record's answer scores from a served model (a pair's chosen and rejected, a group's responses).

    Raises:
        BadScoreError: With ``index`` the flat position of the answer (records' answers in order).
    """
    enc = PolarEncoder(tokenizer, max_length, max_response_length)
    items = [(r["prompt"], r["reference"], record_answers(r)) for r in records]
    keys = [k for p, ref, answers in items for k in [group_key(p, ref)] * len(answers)]  # a record's on one replica
    flat = scorer.score(enc.serving_inputs(items, scorer.server_type, [r.get("wrapper", "sft") for r in records]),
                        keys)
    out, k = [], 0
    for _, _, answers in items:
        out.append(flat[k:k + len(answers)])
        k += len(answers)
    return out


def score_records_remote(scorer: RemoteScorer, tokenizer, records, max_length=DEFAULT_MAX_LENGTH,
                         max_response_length=DEFAULT_MAX_RESPONSE_LENGTH) -> list[tuple[float, float]]:
    """(chosen, rejected) scores of pair records from a served model."""
    return [(s[0], s[1]) for s in score_answers_remote(scorer, tokenizer, records, max_length, max_response_length)]
