"""Evaluation records from our own files and from public benchmarks, by name (``eval_pref --format``).

Every format becomes validated records of :mod:`polar_xtuner.records`: pairs
(prompt/reference/chosen/rejected) or groups (prompt/reference/responses, each
response with a ``label``, ``score`` or ``correct``). The benchmarks' fields,
from their dataset cards and loaders:

* ``polar``: this project's records, pairs or groups, one per line.
* ``verifybench`` (ZJU-REAL/VerifyBench, VerifyBench-Hard): one completion a
  row, ``question``, ``answer`` (the reference), ``completion``,
  ``gold_correct``; the rows of one question (``question_id`` and the
  ``question`` text) and one answer form a group, in file order: rows that
  share an id but ask another question are another group. ``answer_type``
  breaks the results down.
* ``ppe`` (lmarena-ai/PPE-*-Best-of-K): one prompt a row with ``prompt``,
  ``response_1`` .. ``response_K`` and ``scores`` (K booleans, ``scores[i]``
  for ``response_{i+1}``); every ``response_N`` present is read, a missing
  one in between included (K is the largest N). The ground truth is set-specific: ``solution``
  (MATH), ``correct_choice`` (GPQA), ``answer`` with ``options[answer_index]``
  (MMLU-Pro), ``code`` (MBPP-Plus); IFEval has none, so it needs
  ``--references``.
* ``rewardbench2`` (allenai/reward-bench-2): ``id``, ``prompt``, ``chosen``
  and ``rejected`` (lists of strings), ``subset``. It has no reference: each
  row's comes from ``--references``, a jsonl of ``{"id", "reference"}`` that
  the user writes with a model they name.

A reference equal to one of the answers it ranks inflates accuracy (the
answer that matches the reference scores highest), so it is refused, naming
the row, for groups and benchmarks unless ``allow_reference_match``; POLAR's
own pair data often holds such a chosen answer on purpose, so pairs are
counted, not refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from polar_xtuner.errors import UserError
from polar_xtuner.records import (
    Located,
    RecordError,
    join_contents,
    normalise_field,
    record_answers,
    rows_for_flag,
    validate_eval_record,
)

FORMATS = ("polar", "verifybench", "ppe", "rewardbench2")

_PPE_RESPONSE = re.compile(r"response_([1-9]\d*)")
# PPE's ground-truth field per set, in the order tried (the first present wins).
PPE_REFERENCE_FIELDS = ("ground_truth", "solution", "correct_choice", "answer", "code")


@dataclass
class EvalRecord:
    """A validated record ready to score, and where it came from.

    Attributes:
        where: ``file:line`` of its first row.
        line: That row's line (or row) number.
        record: The validated pair or group record.
        digest: A short hash of what is scored (prompt, reference, answers,
            wrapper): saved scores are matched to records by it.
    """

    where: str
    line: int
    record: dict
    digest: str = ""

    def __post_init__(self):
        r = self.record
        key = json.dumps([r.get("wrapper", "sft"), r["prompt"], r["reference"], record_answers(r)],
                         ensure_ascii=False, sort_keys=True)
        self.digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()


@dataclass
class Loaded:
    """What a data file gave: the records to score and the rows skipped (``(where, reason)``)."""

    records: list[EvalRecord]
    skipped: list[tuple[str, str]]
    reference_matches: int = 0


def load_references(path: str) -> dict[str, Any]:
    """``--references``: a jsonl of ``{"id", "reference"}`` (the reference a string or a message list).

    Raises:
        UserError: The file is missing or a row is bad or repeats an id, named by line.
    """
    out: dict[str, Any] = {}
    first: dict[str, str] = {}
    rows = rows_for_flag(path, "--references")
    for item in rows:
        if item.error is not None:
            raise UserError(f"--references {item.where}: {item.error.reason}")
        obj = item.record
        if not isinstance(obj, dict) or "id" not in obj or "reference" not in obj:
            raise UserError(f"--references {item.where}: each line must be {{\"id\", \"reference\"}}")
        try:  # a bad reference is this file's line, not the data row that would use it
            normalise_field("reference", obj["reference"])
        except RecordError as e:
            raise UserError(f"--references {item.where}: {e.reason}") from None
        key = str(obj["id"])
        if key in out:
            raise UserError(f"--references {first[key]} and {item.where}: id {key!r} appears twice; keep one")
        out[key] = obj["reference"]
        first[key] = item.where
    if not out:
        raise UserError(f"--references {path}: no references")
    return out


def _field(obj: dict, name: str, where: str, fmt: str):
    if name not in obj:
        raise UserError(f"{where}: no '{name}' field, which --format {fmt} needs (is this a {fmt} file?)")
    return obj[name]


def _reference(obj: dict, key, references: dict | None, own, where: str, fmt: str):
    """The row's reference: from --references by id when given, else the set's own."""
    if references is not None:
        if key is None:
            raise UserError(f"{where}: the row has no id to look its reference up in --references")
        if str(key) not in references:
            raise UserError(f"{where}: no reference for id {str(key)!r} in --references")
        return references[str(key)]
    if own is None:
        raise UserError(f"{where}: --format {fmt} rows of this set carry no reference; pass --references FILE "
                        f"(a jsonl of {{\"id\", \"reference\"}})")
    return own


def _verifybench(rows: list[Located], references, fmt) -> Iterable[tuple[Located, dict]]:
    groups: dict[tuple, tuple[Located, dict]] = {}
    for item in rows:
        obj = item.record
        question = _field(obj, "question", item.where, fmt)
        completion = _field(obj, "completion", item.where, fmt)
        correct = _field(obj, "gold_correct", item.where, fmt)
        if not isinstance(correct, bool):
            raise UserError(f"{item.where}: 'gold_correct' must be true or false, got {json.dumps(correct)}")
        key = obj.get("question_id", question)
        reference = _reference(obj, key, references, obj.get("answer"), item.where, fmt)
        # a group is one question asked with one reference: the id alone merged distinct questions that shared it
        group_key = (json.dumps(key), json.dumps(question, ensure_ascii=False), json.dumps(reference))
        if group_key not in groups:
            rec = {"prompt": question, "reference": reference, "responses": [], "id": key}
            if "answer_type" in obj:
                rec["subset"] = obj["answer_type"]
            groups[group_key] = (item, rec)
        groups[group_key][1]["responses"].append({"response": completion, "correct": correct})
    return groups.values()


def _ppe_reference(obj: dict):
    for name in PPE_REFERENCE_FIELDS:
        if obj.get(name) not in (None, ""):
            value = obj[name]
            options, index = obj.get("options"), obj.get("answer_index")
            if name == "answer" and isinstance(options, list) and isinstance(index, int) and 0 <= index < len(options):
                return f"{value}. {options[index]}"  # MMLU-Pro: the letter and the option it names
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return None


def _ppe(rows: list[Located], references, fmt) -> Iterable[tuple[Located, dict]]:
    for item in rows:
        obj = item.record
        prompt = _field(obj, "prompt", item.where, fmt)
        flags = _field(obj, "scores", item.where, fmt)
        # every response_N field, whatever its index: a missing response_4 must not hide response_5
        numbers = sorted(int(m.group(1)) for m in map(_PPE_RESPONSE.fullmatch, obj) if m and obj[m.group(0)] is not None)
        if not numbers:
            raise UserError(f"{item.where}: no 'response_1' field, which --format ppe needs (is this a ppe file?)")
        k = numbers[-1]
        if not isinstance(flags, list) or len(flags) != k or not all(isinstance(f, bool) for f in flags):
            raise UserError(f"{item.where}: 'scores' must be {k} booleans, one per response_1..response_{k}")
        key = obj.get("question_id")
        rec = {"prompt": prompt, "reference": _reference(obj, key, references, _ppe_reference(obj), item.where, fmt),
               "responses": [{"response": obj[f"response_{n}"], "correct": flags[n - 1]} for n in numbers],
               "id": key}
        for name in ("category", "type", "Subdomain"):
            if obj.get(name):
                rec["subset"] = obj[name]
                break
        yield item, rec


def _rewardbench2(rows: list[Located], references, fmt) -> Iterable[tuple[Located, dict]]:
    if references is None:
        raise UserError("--format rewardbench2: RewardBench 2 has no reference answers; pass --references FILE, a "
                        "jsonl of {\"id\", \"reference\"} written by a model you name (docs/evaluation.md)")
    for item in rows:
        obj = item.record
        prompt = _field(obj, "prompt", item.where, fmt)
        chosen, rejected = _field(obj, "chosen", item.where, fmt), _field(obj, "rejected", item.where, fmt)
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise UserError(f"{item.where}: 'chosen' and 'rejected' must be lists of answers")
        key = _field(obj, "id", item.where, fmt)
        rec = {"prompt": prompt, "reference": _reference(obj, key, references, None, item.where, fmt),
               "responses": [{"response": c, "correct": True} for c in chosen]
               + [{"response": r, "correct": False} for r in rejected], "id": key}
        if "subset" in obj:
            rec["subset"] = obj["subset"]
        yield item, rec


def _polar(rows: list[Located], references, fmt) -> Iterable[tuple[Located, dict]]:
    for item in rows:
        obj = item.record
        if references is not None and isinstance(obj, dict):
            obj = {**obj, "reference": _reference(obj, obj.get("id"), references, None, item.where, fmt)}
        yield item, obj


_CONVERTERS = {"polar": _polar, "verifybench": _verifybench, "ppe": _ppe, "rewardbench2": _rewardbench2}


def _reference_match(record: dict) -> int | None:
    """The index of the first answer equal to the reference (whitespace at the ends aside), or None."""
    ref = join_contents(record["reference"]).strip()
    for k, answer in enumerate(record_answers(record)):
        if join_contents(answer).strip() == ref:
            return k
    return None


def load_eval_records(path: str, fmt: str = "polar", references: dict | None = None,
                      allow_reference_match: bool = False) -> Loaded:
    """The records of ``path`` read as ``fmt``, validated.

    A pair that breaks the record rules is skipped and reported (the policy
    of every tool); a group that breaks them (fewer than two responses, no
    reference, a bad value), a benchmark row without the format's fields and
    a reference equal to a response are refused.

    Raises:
        UserError: naming the file and line (and the flag where one would help).
    """
    if fmt not in _CONVERTERS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    rows = rows_for_flag(path, "--data")
    skipped = [(it.where, it.error.reason) for it in rows if it.error is not None]
    good = [it for it in rows if it.error is None]
    if fmt != "polar":
        for it in good:
            if not isinstance(it.record, dict):
                raise UserError(f"{it.where}: a {fmt} row must be a JSON object, got {type(it.record).__name__}")
    records, matches = [], 0
    for item, obj in _CONVERTERS[fmt](good, references, fmt):
        try:
            rec = validate_eval_record(obj)
        except RecordError as e:
            # pairs keep every tool's skip-and-report policy; a group or a benchmark row is refused
            if fmt != "polar" or (isinstance(obj, dict) and "responses" in obj):
                raise UserError(f"{item.where}: {e.reason}") from None
            skipped.append((item.where, e.reason))
            continue
        k = _reference_match(rec)
        if k is not None:
            if "responses" in rec and not allow_reference_match:
                raise UserError(f"{item.where}: the reference is identical to response {k + 1}, which then scores "
                                f"highest and inflates accuracy; use an independent reference, or pass "
                                f"--allow-reference-match to keep it")
            matches += 1
        records.append(EvalRecord(item.where, item.line, rec))
    return Loaded(records, skipped, matches)
