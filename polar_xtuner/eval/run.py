"""One evaluation run, as ``tools/eval_pref.py`` asks for it: score, report, compare, write.

The tool parses its flags into an ``argparse.Namespace`` (the flag names are
the attribute names) and calls :func:`evaluate`; scoring is local
(:mod:`polar_xtuner.scoring.local`) or on served models
(:mod:`polar_xtuner.scoring.remote`), with the encoding lengths the model
directory records. Errors are typed (:class:`~polar_xtuner.errors.UserError`,
:class:`~polar_xtuner.errors.VerificationError`); the tool's entry point turns
them into exit codes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

from transformers import AutoTokenizer

from polar_xtuner.constants import DEFAULT_EVAL_BATCH_SIZE, STATS_FILE
from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.errors import UserError, VerificationError
from polar_xtuner.eval.benchmarks import load_eval_records, load_references
from polar_xtuner.eval.plot import plot_scores
from polar_xtuner.eval.report import comparison, format_report, ranking_report
from polar_xtuner.hf_layout import check_model_dir, load_failure, remote_code_allowed
from polar_xtuner.outputs import atomic_file, check_writable, refuse_overlap, require_extension, write_json
from polar_xtuner.records import record_answers, rows_for_flag
from polar_xtuner.scoring.client import DEFAULT_BATCH_TEXTS, BadScoreError, RemoteSettings, TextTooLongError
from polar_xtuner.scoring.local import load_model, score_answers
from polar_xtuner.scoring.remote import check_served_dtype, score_answers_remote


def write_score_stats(model_dir: str, scores, data: str) -> str:
    """Mean and std of every score into MODEL_DIR/polar_reward_stats.json (atomically)."""
    flat = [s for per_record in scores for s in per_record]
    stats = {"mean": statistics.fmean(flat), "std": statistics.pstdev(flat), "n": len(flat), "data": data}
    path = os.path.join(model_dir, STATS_FILE)
    write_json(path, stats)
    return path


def _answer_at(records, index: int) -> tuple[int, int]:
    """(record, answer) of the ``index``-th answer when every record's answers are laid end to end."""
    for k, rec in enumerate(records):
        n = len(record_answers(rec))
        if index < n:
            return k, index
        index -= n
    raise IndexError(index)


def score(args, model_dir: str, loaded, server_address: str | None, flag: str = "--model"):
    """Every record's answer scores from ``model_dir`` (locally, or on the server at ``server_address``).

    Returns:
        (scores, settings, note): the encoding settings used and, when served, the dtype check's line.

    Raises:
        VerificationError: A score is not a finite number (the record named).
    """
    try:
        settings = EncodingSettings.from_model_dir(model_dir).override(args.max_length, args.max_response_length)
    except ValueError as e:
        raise UserError(f"{flag} {e}") from None
    print(f"{flag} {model_dir}: encoding max_length {settings.max_length}, max_response_length "
          f"{settings.max_response_length} (from {settings.source})", file=sys.stderr)
    records = [r.record for r in loaded.records]
    note = None
    if server_address:
        trust = remote_code_allowed(model_dir, args.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise load_failure(model_dir, "tokenizer", e) from None
        remote = RemoteSettings(args.server_type, server_address, timeout=args.timeout,
                                max_retries=args.max_retries, batch_size=args.batch_size or DEFAULT_BATCH_TEXTS,
                                batch_tokens=args.batch_tokens, concurrency=args.concurrency,
                                routing=args.routing)
        scorer = remote.scorer(model_name=os.path.basename(model_dir.rstrip("/")))
        try:
            scores = score_answers_remote(scorer, tokenizer, records, settings.max_length,
                                          settings.max_response_length)
        except TextTooLongError as e:  # the lengths in use say which --max-length would fit
            raise TextTooLongError(f"{e} (texts are cut to {settings.max_length} tokens now, from "
                                   f"{settings.source})") from None
        except BadScoreError as e:
            k, i = _answer_at(records, e.index)
            answer = f"response {i + 1}" if "responses" in records[k] else ("chosen", "rejected")[i] + " answer"
            raise VerificationError(f"{loaded.records[k].where}: the server answered a {e.kind} score "
                                    f"({e.value!r}) for its {answer}; nothing was written") from None
        note = check_served_dtype(scorer, model_dir)
    else:
        model, tokenizer = load_model(model_dir, trust_remote_code=args.trust_remote_code)
        scores = score_answers(model, tokenizer, records, settings.max_length, settings.max_response_length,
                               args.batch_size or DEFAULT_EVAL_BATCH_SIZE, progress=True,
                               shared_prefix=args.shared_prefix)
        del model
    for s, item in zip(scores, loaded.records):
        if not all(math.isfinite(v) for v in s):
            raise VerificationError(f"{item.where}: {flag} {model_dir} scored this record {s}, not finite "
                                    f"numbers; nothing was written")
    return scores, settings, note


def read_saved_scores(path: str, loaded) -> list[list[float]]:
    """The scores a --save-scores file holds for these records, matched by each record's digest.

    Raises:
        UserError: The file is not one, or lacks a record (saved from other data or another --format).
    """
    by_digest: dict[str, list[float]] = {}
    where: dict[str, str] = {}
    rows = rows_for_flag(path, "--compare")
    for item in rows:
        row = item.record if item.error is None else None
        if isinstance(row, dict) and row.get("error") is not None and "line" in row:
            continue  # a row the other run skipped: --save-scores writes it without a digest
        if not isinstance(row, dict) or "digest" not in row:
            raise UserError(f"--compare {item.where}: not a line of eval_pref's --save-scores (no 'digest')")
        values = row["scores"] if "scores" in row else [row.get("chosen"), row.get("rejected")]
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and math.isfinite(v) for v in values):
            raise UserError(f"--compare {item.where}: the scores must be finite numbers")
        digest, scores = str(row["digest"]), [float(v) for v in values]
        if digest in by_digest and by_digest[digest] != scores:  # the same record saved twice must agree
            raise UserError(f"--compare {where[digest]} and {item.where}: record {digest} is saved twice with "
                            "different scores; which run's are these? save them again from one run")
        by_digest[digest] = scores
        where.setdefault(digest, item.where)
    out = []
    for rec in loaded.records:
        got = by_digest.get(rec.digest)
        if got is None or len(got) != len(record_answers(rec.record)):
            raise UserError(f"--compare {path}: no scores for {rec.where} (record {rec.digest}); save them from "
                            f"the same --data and --format")
        out.append(got)
    return out


def evaluate(args) -> int:
    """Run the evaluation ``args`` describes (``tools/eval_pref.py``'s flags); 0 when done.

    Raises:
        UserError: Bad input, named by its flag (a missing model, no valid record, an output over an input).
        VerificationError: A score cannot be trusted.
    """
    check_model_dir(args.model, weights=not args.server_type)  # served: --model gives the tokenizer only
    compare_dir = args.compare is not None and os.path.isdir(args.compare)
    if args.compare is not None:
        if compare_dir:
            check_model_dir(args.compare, "--compare", weights=not args.server_type)
            if args.server_type and not args.compare_server_address:
                raise UserError(f"--compare {args.compare}: with --server-type the other model is served too; "
                                f"pass --compare-server-address HOST:PORT, or its --save-scores .jsonl")
        elif not os.path.isfile(args.compare):
            raise UserError(f"--compare {args.compare}: no such model directory or scores file")
    check_outputs(args)  # before reading or scoring anything
    references = load_references(args.references) if args.references else None
    loaded = load_eval_records(args.data, args.format, references, args.allow_reference_match)
    for where, reason in loaded.skipped:
        print(f"skipped {where}: {reason}", file=sys.stderr)
    if not loaded.records:
        raise UserError(f"--data {args.data}: no valid record to evaluate")
    if loaded.reference_matches:
        print(f"note: in {loaded.reference_matches} pair(s) the reference is identical to one of the answers, "
              f"which a reference-based model rates highly: those pairs are easy", file=sys.stderr)
    other = None
    if args.compare is not None and not compare_dir:
        other = read_saved_scores(args.compare, loaded)  # a bad file fails before any scoring

    scores, settings, note = score(args, args.model, loaded, args.server_type and args.server_address)
    if note:
        print(note, file=sys.stderr)
    if compare_dir:
        other, _, note = score(args, args.compare, loaded, args.compare_server_address, "--compare")
        if note:
            print(note, file=sys.stderr)
    records = [r.record for r in loaded.records]
    report = ranking_report(scores, records)
    report["skipped"] = len(loaded.skipped)
    report["model"] = args.model
    report["data"] = args.data
    report["format"] = args.format
    report["backend"] = args.server_type or "local"
    report["shared_prefix"] = not args.server_type and args.shared_prefix
    report["encoding"] = {"max_length": settings.max_length, "max_response_length": settings.max_response_length,
                          "source": settings.source}
    if other is not None:
        report["compare"] = {"other": args.compare, **comparison(scores, other, records,
                                                                  [r.where for r in loaded.records])}
    print(format_report(report))
    # Each output goes to a temporary sibling and is renamed into place when complete.
    if args.plot:
        name = os.path.basename(args.model.rstrip("/"))
        others = [(os.path.basename(args.compare.rstrip("/")), other)] if other is not None else []
        with atomic_file(args.plot) as tmp:
            plot_scores(scores, tmp, records, others, name)
    if args.out:
        write_json(args.out, report)  # strict JSON: no bare NaN
    if args.write_stats:
        path = write_score_stats(args.model, scores, args.data)
        print(f"wrote {path}", file=sys.stderr)
    if args.save_scores:
        rows = [(rec.line, {"line": rec.line, "digest": rec.digest,
                            **({"scores": s} if "responses" in rec.record else {"chosen": s[0], "rejected": s[1]})})
                for rec, s in zip(loaded.records, scores)]
        rows += [(int(where.rsplit(":", 1)[1]), {"line": int(where.rsplit(":", 1)[1]), "chosen": None,
                                                  "rejected": None, "error": reason})
                 for where, reason in loaded.skipped]
        with atomic_file(args.save_scores) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for _, row in sorted(rows, key=lambda r: r[0]):
                f.write(json.dumps(row, allow_nan=False) + "\n")
    return 0


# What each output is, so that its name says so (the plot's format follows its extension).
OUTPUT_EXTENSIONS = {
    "--out": {".json": "the report, JSON"},
    "--save-scores": {".jsonl": "one JSON line per record"},
    "--plot": {".png": "PNG", ".svg": "SVG", ".pdf": "PDF"},
}


def check_outputs(args) -> None:
    """Refuse outputs that are an input or cannot be written, before any scoring.

    Raises:
        UserError: naming the flag.
    """
    outputs = [("--out", args.out), ("--save-scores", args.save_scores), ("--plot", args.plot)]
    refuse_overlap(outputs, [("--data", args.data), ("--model", args.model), ("--compare", args.compare),
                             ("--references", args.references)])
    for flag, path in outputs:
        if path:
            check_writable(path, flag)
            require_extension(path, flag, OUTPUT_EXTENSIONS[flag])
    if args.write_stats:
        check_writable(os.path.join(args.model, STATS_FILE), "--write-stats")

