"""The record schema: what a POLAR preference record is, and how bad ones fail.

A record is a JSON object with ``prompt``, ``reference``, ``chosen`` and
``rejected``. Each is a list of messages ``{"role": str, "content": str}``; a
plain string is accepted and becomes one message (POLAR's client accepts
strings too). An optional ``margin`` (a finite number) is the gap the pair
must be separated by when the config sets ``margin = True``. Extra keys
(``source``, ``category``, ``id``...) are kept.

Every rule raises :class:`RecordError` naming the field, and
:func:`iter_jsonl` adds the file and the 1-based line number, so a user can go
straight to the bad line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .constants import RECORD_FIELDS

# Who wrote a message in a prompt; answers (reference/chosen/rejected) are
# usually "assistant" but any string role is accepted.
_DEFAULT_ROLE = {"prompt": "user"}


class RecordError(ValueError):
    """A record breaks a schema rule.

    Attributes:
        field: The offending field (or None for record-level problems).
        reason: Human-readable reason that names the field.
        code: Short stable key for histograms (``missing_field``...).
    """

    def __init__(self, reason: str, field: str | None = None, code: str = "invalid"):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.code = code


class DataError(ValueError):
    """A data file cannot be used (missing, unreadable, or records invalid)."""


@dataclass
class Located:
    """A parsed line of a data file and where it came from."""

    source: str
    line: int
    raw: str
    record: dict | None = None
    error: RecordError | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _normalise_field(name: str, value: Any) -> list[dict]:
    if value is None:
        raise RecordError(f"field '{name}' is null", name, "null_field")
    if isinstance(value, str):
        value = [{"role": _DEFAULT_ROLE.get(name, "assistant"), "content": value}]
    if not isinstance(value, list):
        raise RecordError(
            f"field '{name}' must be a list of messages or a string, got {type(value).__name__}",
            name, "bad_type",
        )
    if not value:
        raise RecordError(f"field '{name}' is an empty list", name, "empty_content")
    for i, msg in enumerate(value):
        # runs for every message of every record: error texts are built only on failure
        if not isinstance(msg, dict):
            raise RecordError(
                f"'{name}[{i}]' must be a message object {{role, content}}, got {type(msg).__name__}",
                name, "bad_message",
            )
        if "content" not in msg:
            raise RecordError(f"'{name}[{i}]' has no 'content'", name, "bad_message")
        if "role" in msg and not isinstance(msg["role"], str):
            raise RecordError(f"'{name}[{i}]'.role must be a string", name, "bad_message")
        content = msg["content"]
        if content is None:
            raise RecordError(f"'{name}[{i}]'.content is null", name, "null_field")
        if not isinstance(content, str):
            raise RecordError(
                f"'{name}[{i}]'.content must be a string, got {type(content).__name__}",
                name, "bad_message",
            )
    # all contents blank <=> their concatenation is blank
    if not any(m["content"].strip() for m in value):
        raise RecordError(f"field '{name}' has empty content", name, "empty_content")
    return value


def normalise_field(name: str, value: Any) -> list[dict]:
    """One field checked by the record rules and returned as a message list.

    Raises:
        RecordError: The field breaks a rule (the reason names it).
    """
    return _normalise_field(name, value)


def join_contents(field: Any) -> str:
    """The text of a field: message contents joined with "\\n"; strings as is."""
    if isinstance(field, str):
        return field
    return "\n".join(m["content"] for m in field)


def validate_record(obj: Any) -> dict:
    """Check one record and return it normalised (fields as message lists).

    Args:
        obj: A parsed JSON value.

    Returns:
        A new dict with the four fields as lists of messages and every other
        key untouched.

    Raises:
        RecordError: The first rule the record breaks.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}", None, "not_object")
    missing = [f for f in RECORD_FIELDS if f not in obj]
    if missing:
        raise RecordError(
            "missing field" + ("s " if len(missing) > 1 else " ") + ", ".join(f"'{f}'" for f in missing),
            missing[0], "missing_field",
        )
    out = dict(obj)
    for name in RECORD_FIELDS:
        out[name] = _normalise_field(name, obj[name])
    if join_contents(out["chosen"]) == join_contents(out["rejected"]):
        raise RecordError("'chosen' is identical to 'rejected'", "chosen", "chosen_equals_rejected")
    if "margin" in obj:
        m = obj["margin"]
        # bool is an int in Python, and NaN/inf would poison the loss
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise RecordError(f"'margin' must be a finite number, got {json.dumps(m)}", "margin", "bad_margin")
    return out


def check(item: Located, obj: Any) -> Located:
    """Validate obj into item.record, or set item.error; return item."""
    try:
        item.record = validate_record(obj)
    except RecordError as e:
        item.error = e
    return item


def iter_jsonl(path: str, validate: bool = True) -> Iterator[Located]:
    """Stream a .jsonl file, yielding every non-blank line checked.

    Invalid lines are yielded with ``error`` set, never skipped silently.
    With ``validate=False`` only the JSON is parsed (for converters).

    Raises:
        DataError: The file is missing or unreadable.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .jsonl file")
    try:
        f = open(path, "rb")  # bytes, so a bad byte sequence is pinned to its line
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, bline in enumerate(f, 1):
            try:
                raw = bline.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                item = Located(path, lineno, bline.decode("utf-8", "replace").rstrip("\r\n"))
                item.error = RecordError(f"not UTF-8 text ({e.reason} at byte {e.start})", None, "not_utf8")
                yield item
                continue
            if not raw.strip():
                continue
            item = Located(path, lineno, raw)
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                item.error = RecordError(f"invalid JSON ({e.msg} at column {e.colno})", None, "invalid_json")
                yield item
                continue
            if validate:
                yield check(item, obj)
            else:
                item.record = obj
                yield item


def load_records(paths: str | list[str], max_errors_shown: int = 5) -> list[dict]:
    """Read and validate jsonl files; fail on the first bad file with details.

    Used where a bad record must stop the run (training data): every error is
    counted, the first few are shown with file, line and field.

    Raises:
        DataError: Any record is invalid, a file is missing, or nothing is left.
    """
    if isinstance(paths, str):
        paths = [paths]
    records, errors = [], []
    for path in paths:
        for item in iter_jsonl(path):
            if item.error is not None:
                errors.append(f"{item.where}: {item.error.reason}")
            else:
                records.append(item.record)
    if errors:
        shown = "\n  ".join(errors[:max_errors_shown])
        more = f"\n  ... and {len(errors) - max_errors_shown} more" if len(errors) > max_errors_shown else ""
        raise DataError(
            f"{len(errors)} invalid record(s) in {', '.join(paths)}:\n  {shown}{more}\n"
            "Fix them, or run tools/build_dataset.py to keep only the valid ones."
        )
    if not records:
        raise DataError(f"no records in {', '.join(paths)}")
    return records
