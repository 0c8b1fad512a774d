"""Check raw preference files and write clean training data.

The logic behind ``tools/build_dataset.py``: stream every input record, keep
the valid ones (normalised), and write every rejected one with its file, line,
reason and raw text, so nothing is lost silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from tqdm import tqdm

from polar_xtuner.constants import packed_length
from polar_xtuner.data.formats import CONVERTERS, DEFAULT_PAIRS_PER_PROMPT, TAKES_OPTIONS
from polar_xtuner.encoding import PolarEncoder, pair_items
from polar_xtuner.errors import UserError
from polar_xtuner.hf_layout import hub_unreachable, remote_code_allowed, training_run_problem
from polar_xtuner.outputs import atomic_dir, check_writable_dir, refuse_foreign, refuse_overlap, write_json
from polar_xtuner.records import DATA_SUFFIXES, DataError, Located, RecordError, check, iter_records

OUTPUTS = ("train.jsonl", "val.jsonl", "rejected.jsonl", "report.json")


def expand_sources(sources: list[str]) -> list[str]:
    """Files from files and directories (the data files inside, sorted)."""
    files = []
    for src in sources:
        if os.path.isdir(src):
            found = sorted(
                os.path.join(src, n) for n in os.listdir(src) if n.endswith(DATA_SUFFIXES)
            )
            if not found:
                raise DataError(f"{src}: directory has no data files ({', '.join(DATA_SUFFIXES)})")
            files.extend(found)
        elif os.path.exists(src):
            files.append(src)
        else:
            raise DataError(f"{src}: no such file or directory")
    return files


def iter_source(path: str, fmt: str = "polar", options: dict | None = None) -> Iterator[Located]:
    """Checked records of one file; other formats are converted first (with ``options``)."""
    if fmt == "polar":
        yield from iter_records(path)
        return

    convert = CONVERTERS[fmt]
    if options:
        convert = functools.partial(convert, **options)
    for item in iter_records(path, validate=False):
        if item.error is not None:
            yield item
            continue
        try:
            for rec in convert(item.record):
                yield check(Located(item.source, item.line, item.raw), rec)
        except RecordError as e:
            item.record, item.error = None, e
            yield item


@dataclass
class BuildResult:
    kept: int = 0
    rejected: int = 0
    duplicates: int = 0
    val: int = 0
    reasons: Counter = field(default_factory=Counter)
    files: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    # --from policies: kept triples per input prompt ("file:line") and per policy
    by_prompt: Counter = field(default_factory=Counter)
    by_policy: dict = field(default_factory=dict)

    def summary(self, out_dir: str) -> list[str]:
        """What the build kept and why it rejected the rest, as the tool prints it."""
        lines = [f"kept {self.kept} record(s) ({self.kept - self.val} train, {self.val} val), "
                 f"rejected {self.rejected}, duplicates removed {self.duplicates} -> {out_dir}"]
        lines += [f"  rejected {n:>6}  {reason}" for reason, n in self.reasons.most_common()]
        if self.rejected:
            lines.append(f"  details: {out_dir}/rejected.jsonl")
        triples = self.report.get("policy_triples")
        if triples:
            lines.append(f"  triples from {triples['prompts_with_triples']} prompt(s), at most "
                         f"{triples['pairs_per_prompt']} each (seed {triples['seed']}); per policy "
                         f"(reference+chosen / rejected):")
            lines += [f"    {policy:<24} {n['reference_and_chosen']:>7} / {n['rejected']:<7}"
                      for policy, n in triples["per_policy"].items()]
        lengths = self.report.get("lengths")
        if lengths:
            lines += [f"  tokens {name:<10} mean {st['mean']:>8}  p95 {st['p95']:>6}  max {st['max']:>6}"
                      for name, st in lengths["tokens"].items() if st]
            cut = ", ".join(f"{k} {v}" for k, v in lengths["truncated"].items())
            lines.append(f"  truncated: {cut}; over max_packed_length: {lengths['over_max_packed_length']}")
        return lines

    def to_json(self) -> dict:
        return {
            "sources": self.files,
            "kept": self.kept,
            "train": self.kept - self.val,
            "val": self.val,
            "rejected": self.rejected,
            "duplicates_removed": self.duplicates,
            "rejected_by_reason": dict(self.reasons.most_common()),
        }


def _record_key(rec: dict) -> str:
    core = {k: rec[k] for k in ("prompt", "reference", "chosen", "rejected", "margin") if k in rec}
    return hashlib.sha1(json.dumps(core, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _is_val(rec: dict, seed: int, ratio: float, key: str | None = None) -> bool:
    # A hash of the content decides, so the split is stable across runs and
    # independent of file order.
    h = hashlib.sha1(f"{seed}:{key or _record_key(rec)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < ratio


CHUNK = 1000  # records tokenized per batch


def length_meter(tokenizer_dir: str, max_length: int, max_response_length: int, max_packed_length: int | None,
                 trust_remote_code: bool = False) -> "LengthMeter":
    """A :class:`LengthMeter` over the tokenizer in ``tokenizer_dir`` (``--tokenizer``), with the training lengths.

    Raises:
        UserError: The directory is a training run's, holds code run without consent, or does not load.
    """
    problem = training_run_problem(tokenizer_dir, f"--tokenizer {tokenizer_dir}")
    if problem:  # before the code check, which would advise --trust-remote-code for xtuner's config copy
        raise UserError(problem)
    # Lazy: transformers takes seconds to import, and the checker without --tokenizer never needs it.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir,
                                            trust_remote_code=remote_code_allowed(tokenizer_dir, trust_remote_code))
    except UserError:
        raise
    except OSError as e:  # a hub name on an offline machine, or a directory that does not load
        raise hub_unreachable(tokenizer_dir, "--tokenizer", e) from None
    except ValueError as e:
        raise UserError(f"--tokenizer {tokenizer_dir}: cannot load it ({' '.join(str(e).split())})") from None
    return LengthMeter(tok, max_length, max_response_length, packed_length(max_length, max_packed_length))


class LengthMeter:
    """Token lengths per field and what truncation/packing will do to them.

    Args:
        tokenizer: The model's tokenizer.
        max_length, max_response_length, max_packed_length: Training settings.
    """

    FIELDS = ("prompt", "reference", "chosen", "rejected")

    def __init__(self, tokenizer, max_length: int, max_response_length: int, max_packed_length: int):
        from array import array

        self.enc = PolarEncoder(tokenizer, max_length, max_response_length)
        self.max_length, self.max_response_length = max_length, max_response_length
        self.max_packed_length = max_packed_length
        self.lengths = {f: array("I") for f in self.FIELDS + ("pair",)}
        self.truncated = Counter()
        self.over_packed = 0

    def measure(self, records: list[dict]) -> list[str | None]:
        """Record lengths; return per record why it is overlong (or None).

        A field far longer than truncation keeps is tokenized in windows
        (:class:`polar_xtuner.encoding.windows.ClippedIds`): its length is recorded as
        the lower bound the windows give, and the reason says "at least". Such
        a field is over its limit by construction, so the truncation counts
        stay exact; the pair lengths come from the built sequences, as always.
        """
        items = pair_items(records)
        fields = self.enc.encode_fields(items)  # tokenized once, for lengths and features
        p_ids, r_ids, c_ids = fields
        per_field = {"prompt": p_ids, "reference": r_ids, "chosen": c_ids[0::2], "rejected": c_ids[1::2]}
        lens = {f: [getattr(x, "at_least", len(x)) for x in ids] for f, ids in per_field.items()}
        clipped = {f: [hasattr(x, "at_least") for x in ids] for f, ids in per_field.items()}
        pairs = [len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in self.enc.encode_pairs(records, fields)]

        def tokens(f, i):
            return f"{f} {'at least ' if clipped[f][i] else ''}{lens[f][i]} tokens"

        reasons = []
        for i in range(len(records)):
            why = []
            for f in ("reference", "chosen", "rejected"):
                if lens[f][i] > self.max_response_length:
                    self.truncated[f] += 1
                    why.append(f"{tokens(f, i)} > max_response_length {self.max_response_length}")
            cut = [min(lens[f][i], self.max_response_length) for f in ("reference", "chosen", "rejected")]
            budget = self.enc.prompt_budget(cut[0], max(cut[1:]))
            if lens["prompt"][i] > budget:
                self.truncated["prompt"] += 1
                why.append(f"{tokens('prompt', i)} > its budget {max(budget, 0)}")
            if pairs[i] > self.max_packed_length:
                self.over_packed += 1
                why.append(f"pair {pairs[i]} tokens > max_packed_length {self.max_packed_length}")
            for f in self.FIELDS:
                self.lengths[f].append(lens[f][i])
            self.lengths["pair"].append(pairs[i])
            reasons.append("overlong: " + "; ".join(why) if why else None)
        return reasons

    def report(self) -> dict:
        def stats(a):
            if not a:
                return {}
            v = sorted(a)
            pick = lambda q: v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]  # noqa: E731
            return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": pick(0.5), "p95": pick(0.95),
                    "p99": pick(0.99), "max": v[-1]}

        return {
            "settings": {"max_length": self.max_length, "max_response_length": self.max_response_length,
                         "max_packed_length": self.max_packed_length},
            "tokens": {f: stats(a) for f, a in self.lengths.items()},
            "truncated": {f: self.truncated[f] for f in self.FIELDS},
            "over_max_packed_length": self.over_packed,
        }


def build(sources: list[str], out_dir: str, val_ratio: float = 0.0, val_size: int = 0,
          seed: int = 0, dedupe: bool = False, progress: bool = True, meter: LengthMeter | None = None,
          drop_overlong: bool = False, fmt: str = "polar", pairs_per_prompt: int | None = None) -> BuildResult:
    """Validate sources; write train.jsonl, val.jsonl, rejected.jsonl, report.json.

    Records stream through in chunks, so memory does not grow with the input
    (except for ``val_size``, which samples from all kept records, and
    ``dedupe``, which keeps one hash per record).

    Args:
        sources: Files or directories.
        out_dir: Output directory (created).
        val_ratio: Share of kept records for val.jsonl (hash-based, stable).
        val_size: Exact number of val records (seeded sample); exclusive with val_ratio.
        seed: Seed of the split.
        dedupe: Drop exact duplicates of the four fields.
        progress: Show a progress bar.
        meter: With a tokenizer: token-length statistics in the report.
        drop_overlong: With a meter: reject records that would be truncated
            or exceed max_packed_length (otherwise they are only counted).
        fmt: Input format: "polar", or one of :mod:`polar_xtuner.data.formats`.
        pairs_per_prompt: With ``fmt="policies"``: most triples per prompt
            (drawn with ``seed``); the report counts them per prompt and policy.

    Raises:
        DataError: Missing/unreadable input, conflicting options.
    """
    if val_ratio and val_size:
        raise DataError("--val-ratio and --val-size are mutually exclusive")
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if drop_overlong and meter is None:
        raise DataError("--drop-overlong needs --tokenizer")

    options = None
    if fmt in TAKES_OPTIONS:
        k = DEFAULT_PAIRS_PER_PROMPT if pairs_per_prompt is None else pairs_per_prompt
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DataError(f"--pairs-per-prompt must be a positive integer, got {k}")
        options = {"seed": seed, "pairs_per_prompt": k}
    elif pairs_per_prompt is not None:
        raise DataError(f"--pairs-per-prompt applies to --from policies only, not --from {fmt}")
    refuse_overlap({"-o": out_dir}, [("SRC", src) for src in sources])
    files = expand_sources(sources)
    check_writable_dir(out_dir, "-o")
    refuse_foreign(out_dir, "-o", OUTPUTS.__contains__, DataError)
    res = BuildResult(files=files)
    seen: set[str] = set()
    # The whole directory is written beside OUT_DIR and swapped in when the
    # run succeeded: a failed or killed run leaves the previous outputs as
    # they were, and never a half-written file that looks done.
    with atomic_dir(out_dir) as tmp_dir:
        tmp = {name: os.path.join(tmp_dir, name) for name in OUTPUTS}
        _build_into(files, tmp, res, seen, val_ratio, val_size, seed, dedupe, progress, meter, drop_overlong, fmt,
                    options)
        if not (val_ratio or val_size):
            os.remove(tmp["val.jsonl"])
    return res


def _build_into(files, tmp, res, seen, val_ratio, val_size, seed, dedupe, progress, meter, drop_overlong, fmt,
                options=None):
    kept_lines = [] if val_size else None
    with open(tmp["train.jsonl"], "w", encoding="utf-8") as train_f, \
            open(tmp["rejected.jsonl"], "w", encoding="utf-8") as rej_f, \
            open(tmp["val.jsonl"], "w", encoding="utf-8") as val_f, \
            tqdm(desc="Checking records", unit=" rec", disable=not progress) as bar:

        def reject(item, reason, field, code):
            res.rejected += 1
            res.reasons[code] += 1
            rej_f.write(json.dumps({"source": item.source, "line": item.line, "field": field,
                                    "reason": reason, "raw": item.raw}, ensure_ascii=False) + "\n")

        def flush(pending):
            overlong = meter.measure([it.record for it in pending]) if meter else [None] * len(pending)
            for item, why in zip(pending, overlong):
                if why and drop_overlong:
                    reject(item, why, None, "overlong")
                    continue
                res.kept += 1
                if options is not None:
                    rec = item.record
                    res.by_prompt[f"{item.source}:{item.line}"] += 1
                    for policy, role in ((rec["policy"], "reference_and_chosen"), (rec["rejected_policy"], "rejected")):
                        counts = res.by_policy.setdefault(policy, {"reference_and_chosen": 0, "rejected": 0})
                        counts[role] += 1
                line = json.dumps(item.record, ensure_ascii=False) + "\n"
                if kept_lines is not None:
                    kept_lines.append(line)
                # --from policies: one input prompt's triples all land on one side
                elif val_ratio and _is_val(item.record, seed, val_ratio, item.raw if options is not None else None):
                    res.val += 1
                    val_f.write(line)
                else:
                    train_f.write(line)
            pending.clear()

        pending = []
        for path in files:
            for item in iter_source(path, fmt, options):
                bar.update(1)
                if item.error is not None:
                    reject(item, item.error.reason, item.error.field, item.error.code)
                    continue
                if dedupe:
                    key = _record_key(item.record)
                    if key in seen:
                        res.duplicates += 1
                        continue
                    seen.add(key)
                pending.append(item)
                if len(pending) >= CHUNK:
                    flush(pending)
        flush(pending)
        if kept_lines is not None:
            if val_size >= len(kept_lines):
                raise DataError(f"--val-size {val_size} leaves no training record (kept {len(kept_lines)})")
            val_idx = set(random.Random(seed).sample(range(len(kept_lines)), val_size))
            for i, line in enumerate(kept_lines):
                (val_f if i in val_idx else train_f).write(line)
            res.val = val_size
    report = res.to_json()
    if options is not None:
        per_prompt = list(res.by_prompt.values())
        report["policy_triples"] = {
            **options,
            "prompts_with_triples": len(per_prompt),
            "triples_per_prompt_histogram": {str(n): c for n, c in sorted(Counter(per_prompt).items())},
            "per_policy": dict(sorted(res.by_policy.items())),
            "per_prompt": dict(res.by_prompt),
        }
    if meter is not None:
        report["lengths"] = meter.report()
    write_json(tmp["report.json"], report)
    res.report = report
