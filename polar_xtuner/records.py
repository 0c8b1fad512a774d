"""The record schema: what a POLAR preference record is, and how bad ones fail.

A record is a JSON object with ``prompt``, ``reference``, ``chosen`` and
``rejected``. Each is a list of messages ``{"role": str, "content": str}``; a
plain string is accepted and becomes one message (POLAR's client accepts
strings too). An optional ``margin`` (a finite number) is the gap the pair
must be separated by when the config sets ``margin = True``. Extra keys
(``source``, ``category``, ``id``...) are kept.

Every rule raises :class:`RecordError` naming the field, and
:func:`iter_records` adds the file and the 1-based line number, so a user can go
straight to the bad line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

from polar_xtuner.constants import RECORD_FIELDS
from polar_xtuner.errors import UserError

# Who wrote a message in a prompt; answers (reference/chosen/rejected) are
# usually "assistant" but any string role is accepted.
_DEFAULT_ROLE = {"prompt": "user"}


class RecordError(UserError):
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


def finite_number(value, where: str, field: str | None = None) -> float:
    """``value`` as a float, or a RecordError naming ``where``.

    JSON numbers only: a bool is an int in Python and a string is not a number,
    and NaN or +-Infinity (which Python's json reads) would poison a loss, a
    ranking or a report.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"'{where}' must be a finite number, got {json.dumps(value)}",
                          field or where.split("[")[0].split(".")[0], "bad_number")
    return float(value)


def refuse_non_finite(value: Any, where: str) -> None:
    """Refuse NaN or +-Infinity anywhere inside ``value`` (kept keys are written out as JSON again)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f"'{where}' is {json.dumps(value)}, which is not a finite number",
                          where.split("[")[0].split(".")[0], "bad_number")
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_non_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_non_finite(v, f"{where}[{i}]")


class DataError(UserError):
    """A data file cannot be used (missing, unreadable, or records invalid). Exit 2."""


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
        try:
            finite_number(obj["margin"], "margin")
        except RecordError as e:
            raise RecordError(e.reason, "margin", "bad_margin") from None
    for key, value in obj.items():
        if key not in RECORD_FIELDS and key != "margin":
            refuse_non_finite(value, key)
    return out


# A group record's responses carry one of these values each (the same one in a record).
RESPONSE_VALUES = ("label", "score", "correct")


def _blank_answer(raw: Any) -> str | None:
    """The text of an answer that says nothing (blank string, or messages of blank string content), else None."""
    if isinstance(raw, str):
        return raw if not raw.strip() else None
    if isinstance(raw, list) and raw and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in raw):
        text = "\n".join(m["content"] for m in raw)
        return text if not text.strip() else None
    return None


def validate_group_record(obj: Any) -> dict:
    """Check one group record and return it normalised.

    A group record is ``{"prompt", "reference", "responses": [{"response",
    "label" | "score" | "correct"}, ...]}``: at least two responses, each with
    one value of the same kind, a finite number (``label``, ``score``; higher
    is better) or a boolean (``correct``). Other keys are kept.

    Raises:
        RecordError: The first rule the record breaks (code ``one_response``
            for a group that cannot rank anything).
    """
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}", None, "not_object")
    missing = [f for f in ("prompt", "reference", "responses") if f not in obj]
    if missing:
        raise RecordError("missing field" + ("s " if len(missing) > 1 else " ") + ", ".join(f"'{f}'" for f in missing),
                          missing[0], "missing_field")
    out = dict(obj)
    for name in ("prompt", "reference"):
        out[name] = _normalise_field(name, obj[name])
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise RecordError(f"field 'responses' must be a list, got {type(responses).__name__}", "responses", "bad_type")
    if len(responses) < 2:
        raise RecordError(f"'responses' holds {len(responses)} response(s); a group needs at least 2 to rank",
                          "responses", "one_response")
    kinds = set()
    normalised = []
    for i, resp in enumerate(responses):
        where = f"responses[{i}]"
        if not isinstance(resp, dict) or "response" not in resp:
            raise RecordError(f"'{where}' must be an object with 'response' and one of "
                              f"{', '.join(RESPONSE_VALUES)}", "responses", "bad_response")
        present = [k for k in RESPONSE_VALUES if k in resp]
        if len(present) != 1:
            raise RecordError(f"'{where}' must have exactly one of {', '.join(RESPONSE_VALUES)}, has "
                              f"{', '.join(present) or 'none'}", "responses", "bad_response")
        kind = present[0]
        kinds.add(kind)
        if kind == "correct":
            if not isinstance(resp[kind], bool):
                raise RecordError(f"'{where}.correct' must be true or false, got {json.dumps(resp[kind])}",
                                  "responses", "bad_response")
        else:
            finite_number(resp[kind], f"{where}.{kind}", "responses")
        item = dict(resp)
        raw = resp["response"]
        blank = _blank_answer(raw)
        if blank is not None:
            # an empty answer is an answer to rank (a policy that said nothing), not a broken record,
            # whether given as "" or as messages with empty content
            item["response"] = [{"role": "assistant", "content": blank}]
        else:
            item["response"] = _normalise_field(f"{where}.response", raw)
        for key, value in resp.items():
            if key not in ("response", kind):
                refuse_non_finite(value, f"{where}.{key}")
        normalised.append(item)
    if len(kinds) > 1:
        raise RecordError(f"'responses' mix {' and '.join(sorted(kinds))}; use one kind of value per record",
                          "responses", "bad_response")
    kind = kinds.pop()
    seen: dict[str, int] = {}
    for i, item in enumerate(normalised):  # as a pair refuses chosen == rejected
        text = join_contents(item["response"])
        j = seen.setdefault(text, i)
        if j != i and normalised[j][kind] != item[kind]:
            raise RecordError(f"'responses[{j}]' and 'responses[{i}]' are the same answer with different "
                              f"{kind} values ({json.dumps(normalised[j][kind])}, {json.dumps(item[kind])})",
                              "responses", "same_answer_different_values")
    out["responses"] = normalised
    for key, value in obj.items():
        if key not in ("prompt", "reference", "responses"):
            refuse_non_finite(value, key)
    return out


def response_values(record: dict) -> tuple[list[float], str]:
    """A validated record's responses' values and their kind; a pair is [chosen, rejected] labelled [1, 0]."""
    if "responses" not in record:
        return [1.0, 0.0], "label"
    kind = next(k for k in RESPONSE_VALUES if k in record["responses"][0])
    return [float(r[kind]) for r in record["responses"]], kind


def record_answers(record: dict) -> list:
    """A validated record's answers in order: its responses, or chosen then rejected."""
    if "responses" in record:
        return [r["response"] for r in record["responses"]]
    return [record["chosen"], record["rejected"]]


def validate_eval_record(obj: Any) -> dict:
    """A pair record or, when it has ``responses``, a group record: checked and normalised."""
    if isinstance(obj, dict) and "responses" in obj:
        return validate_group_record(obj)
    return validate_record(obj)


def check(item: Located, obj: Any) -> Located:
    """Validate obj into item.record, or set item.error; return item."""
    try:
        item.record = validate_record(obj)
    except RecordError as e:
        item.error = e
    return item


class DuplicateKeyError(UserError):
    """An object names one key twice (JSON keeps the last silently)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs):
    # A JSON object with a key twice has no single meaning (Python would keep
    # the last value silently), so such a record is rejected, naming the key.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKeyError(k)
            seen.add(k)
    return obj


def parse_json(text: str):
    """json.loads that refuses duplicate keys (DuplicateKeyError) and keeps NaN literals for the rules."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def read_settings(path: str) -> dict:
    """A settings file: one JSON object, no key twice (the project's one reader of such files).

    Raises:
        ValueError: The file cannot be read, is not JSON, names a key twice,
            or is not an object; the message says which.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = parse_json(f.read())
    except DuplicateKeyError as e:
        raise ValueError(f"the key {e.key!r} appears twice") from None
    except (OSError, ValueError) as e:
        raise ValueError(str(e)) from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


# A line (one record) longer than this is refused, naming the file and line, instead of
# growing without bound (a file with no newline; /dev/zero). The long-record path keeps
# only what truncation needs of a record, so real records stay far below it.
MAX_LINE_BYTES = 256 * 2**20
# A .json array is parsed whole: the same bound for the whole file.
MAX_JSON_ARRAY_BYTES = 2 * 2**30
# A pipe or FIFO must deliver its first byte (or close) within this many seconds; a FIFO
# nobody writes to would otherwise block the reader for ever.
STREAM_FIRST_BYTE_TIMEOUT_S = 60.0


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file ({', '.join(DATA_SUFFIXES)})")


def input_kind(path: str) -> str:
    """``"file"`` (a regular file) or ``"stream"`` (a pipe, FIFO or socket, read once, front to back).

    Raises:
        DataError: The path is missing, a directory, or a device (``/dev/zero``, a terminal): not data.
    """
    import stat

    _check_file(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "stream"
    what = "a terminal or character device" if stat.S_ISCHR(mode) else "a device or special file"
    raise DataError(f"{path}: is {what}, not a data file; give a file, a pipe or a FIFO "
                    f"({', '.join(DATA_SUFFIXES)})")


def require_regular_file(path: str, why: str) -> None:
    """Refuse a pipe or FIFO where the data must be read more than once (``why`` says where)."""
    if input_kind(path) != "file":
        raise DataError(f"{path}: is a pipe or FIFO, which can be read only once; {why}: "
                        "write it to a file first")


class _Prefixed:
    """A binary stream with bytes already read put back in front (the format sniff's)."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        if len(out) < n:
            out += self._stream.read(n - len(out))
        return out

    def readline(self, limit: int = -1) -> bytes:
        if self._head:
            nl = self._head.find(b"\n")
            if nl >= 0 and (limit < 0 or nl < limit):
                out, self._head = self._head[:nl + 1], self._head[nl + 1:]
                return out
            out, self._head = self._head, b""
            if limit >= 0 and len(out) >= limit:
                self._head = out[limit:]
                return out[:limit]
            return out + self._stream.readline(-1 if limit < 0 else limit - len(out))
        return self._stream.readline(limit)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_stream(path: str):
    """A pipe or FIFO opened without blocking on a missing writer, then read blocking."""
    import fcntl
    import select

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    poll = select.poll()
    poll.register(fd, select.POLLIN | select.POLLHUP)
    if not poll.poll(int(STREAM_FIRST_BYTE_TIMEOUT_S * 1000)):
        os.close(fd)
        raise DataError(f"{path}: a pipe or FIFO that gave nothing within {STREAM_FIRST_BYTE_TIMEOUT_S:g} s "
                        "(no writer?); start the writer, or give a file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def open_input(path: str):
    """``(binary stream, container)`` of a data file, opened once: nothing read is lost to the sniff.

    The container ("gzip", "parquet" or "text") comes from the first bytes,
    which are put back in front of the stream. A regular file, a pipe or a
    FIFO (``<(cat f)``, ``/dev/stdin`` under a pipe) are read alike; a
    device is refused.

    Raises:
        DataError: As :func:`input_kind`; a stream with no writer; an unreadable file.
    """
    kind = input_kind(path)
    try:
        raw = open(path, "rb") if kind == "file" else _open_stream(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    head = b""
    try:
        while len(head) < 4:
            chunk = raw.read(4 - len(head))
            if not chunk:
                break
            head += chunk
    except OSError as e:
        raw.close()
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if head[:2] == _GZIP_MAGIC:
        container = "gzip"
    elif head == _PARQUET_MAGIC:
        container = "parquet"
    else:
        container = "text"
    if kind == "file":
        raw.seek(0)
        return raw, container
    return _Prefixed(head, raw), container


def iter_records(path: str, validate: bool = True) -> Iterator[Located]:
    """Every record of one data file, whatever its format: the one reader of the project.

    JSON Lines (``.jsonl``), a JSON array (``.json``; the line is the index
    + 1), either gzip-compressed (found by its magic bytes, whatever the
    name), or Parquet (one record per row; the line is the row + 1). Invalid
    records are yielded with ``error`` set, never skipped silently. The file
    is opened once and read front to back, so a pipe or FIFO works as a file
    does (Parquet, read from its end, needs a file).

    Raises:
        DataError: The file is missing, unreadable, a device, a line longer
            than :data:`MAX_LINE_BYTES`, or not one of these formats.
    """
    stream, kind = open_input(path)
    with stream:
        if kind == "parquet":
            if isinstance(stream, _Prefixed):
                raise DataError(f"{path}: Parquet is read from its end, which a pipe or FIFO cannot give; "
                                "write it to a file first")
            yield from _iter_parquet(path, validate)
            return
        name = path[:-3] if path.endswith(".gz") else path
        if kind == "gzip":
            import gzip

            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        if name.endswith(".json"):
            yield from _iter_json_array(path, stream, validate)
        else:
            yield from _iter_lines(path, stream, validate)


def _parsed(item: Located, validate: bool) -> Located:
    try:
        obj = parse_json(item.raw)
    except json.JSONDecodeError as e:
        item.error = RecordError(f"invalid JSON ({e.msg} at column {e.colno})", None, "invalid_json")
        return item
    except DuplicateKeyError as e:
        item.error = RecordError(f"key '{e.key}' appears twice in one object; keep one", e.key, "duplicate_key")
        return item
    except RecursionError:
        item.error = RecordError("JSON nested too deeply", None, "invalid_json")
        return item
    if validate:
        return check(item, obj)
    item.record = obj
    return item


def _iter_lines(path: str, f, validate: bool) -> Iterator[Located]:
    import zlib

    lineno = 0
    try:
        while True:
            bline = f.readline(MAX_LINE_BYTES + 1)
            if not bline:
                break
            lineno += 1
            if len(bline) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: a line of more than {MAX_LINE_BYTES // 2**20} MiB; "
                                "one record per line is expected (is this a data file?)")
            if lineno == 1 and bline.startswith(b"\xef\xbb\xbf"):
                bline = bline[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                raw = bline.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                item = Located(path, lineno, bline.decode("utf-8", "replace").rstrip("\r\n"))
                item.error = RecordError(f"not UTF-8 text ({e.reason} at byte {e.start})", None, "not_utf8")
                yield item
                continue
            if not raw.strip():
                continue
            yield _parsed(Located(path, lineno, raw), validate)
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}:{lineno + 1}: cannot decompress ({e}); the file is truncated or "
                        f"corrupt") from None


def _iter_json_array(path: str, f, validate: bool) -> Iterator[Located]:
    import zlib

    try:
        data = f.read(MAX_JSON_ARRAY_BYTES + 1)
        if len(data) > MAX_JSON_ARRAY_BYTES:
            raise DataError(f"{path}: a .json array of more than {MAX_JSON_ARRAY_BYTES // 2**30} GiB is read "
                            "whole; write it as JSON Lines (.jsonl), one record per line")
        text = data.decode("utf-8-sig")  # a byte-order mark is accepted
        records = json.loads(text, object_pairs_hook=_no_duplicate_keys_lenient)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json source must hold an array of records")
    for i, obj in enumerate(records, 1):
        item = Located(path, i, json.dumps(obj, ensure_ascii=False))
        if isinstance(obj, _Duplicated):
            item.error = RecordError(f"key '{obj.key}' appears twice in one object; keep one", obj.key,
                                     "duplicate_key")
            yield item
        elif validate:
            yield check(item, obj)
        else:
            item.record = obj
            yield item


class _Duplicated(dict):
    """An object of a JSON array that had a duplicate key (so the whole file need not fail)."""

    key = ""


def _no_duplicate_keys_lenient(pairs):
    try:
        return _no_duplicate_keys(pairs)
    except DuplicateKeyError as e:
        out = _Duplicated(pairs)
        out.key = e.key
        return out


def _iter_parquet(path: str, validate: bool) -> Iterator[Located]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read it as Parquet ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            item = Located(path, row, json.dumps(obj, ensure_ascii=False, default=str))
            if validate:
                yield check(item, obj)
            else:
                item.record = obj
                yield item


def rows_for_flag(path: str, flag: str) -> list[Located]:
    """Every row of the file a flag names, as read (unvalidated), for a reader of its own format.

    Raises:
        UserError: The file cannot be read, the message led by ``flag``.
    """
    try:
        return list(iter_records(path, validate=False))
    except DataError as e:
        raise UserError(f"{flag} {e}") from None


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
        for item in iter_records(path):
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
