"""Preference accuracy, best-of-N and MRR of a POLAR model, alone or against another model.

Usage:
    python tools/eval_pref.py --model PATH --data FILE [--format polar|verifybench|ppe|rewardbench2]
        [--references REFS.jsonl] [--allow-reference-match] [--out report.json]
        [--save-scores scores.jsonl] [--compare OTHER_MODEL_DIR|OTHER_SCORES.jsonl]
        [--compare-server-address HOST:PORT] [--plot FILE.png|.svg|.pdf] [--batch-size N]
        [--batch-tokens N] [--max-length N --max-response-length N]
        [--server-type sglang|vllm|lmdeploy --server-address HOST:PORT[,HOST:PORT...]]
        [--concurrency N] [--write-stats]

Records are pairs (prompt/reference/chosen/rejected: correct when the chosen
answer outscores the rejected one under the same reference) or groups
(prompt/reference/responses, each response with a label, score or correct
flag); --format reads public benchmarks by name (docs/evaluation.md). The
report gives pairwise accuracy over every ordered pair the labels define,
best-of-N (the top-scored response is a best one), the mean reciprocal rank
of the first best response and ties, each with a 95% bootstrap interval over
records, broken down by source, subset and category. --compare scores another
model on the same records (or reads its --save-scores file) and adds the
difference per metric with a paired interval, McNemar's test and the records
on which they disagree. Invalid pair records are reported (file:line:
reason) and skipped; a group record that breaks a rule (one response, no
reference), a benchmark row without its format's fields and a reference
equal to a response it ranks are refused.
With --server-type the scores come from a served model and --model only
provides the tokenizer and the encoding lengths. The lengths default to the
ones the converter saved in the model directory (polar_encoding.json), so
sequences are truncated as in training; --max-length / --max-response-length
override them. --write-stats saves the mean and std of all the scores into
the model directory (polar_reward_stats.json), for the RL reward functions'
POLAR_NORMALIZE=1 (polar_xtuner/rft.py).
A directory's Python code runs only when it is the code this project ships
(every converted model), or with --trust-remote-code.
Exit codes: 0 done, 2 bad input or environment (missing model or data, no
valid record, an output over an input, not writable or named with another
format's extension, texts longer than the server's limit: see
--max-length), 3 the scores cannot be trusted (the server
failed after bounded retries, or a score is not a finite number). A server
request gives up after --timeout seconds in all (connecting, sending, the
first byte and the whole body), a batch after --max-retries of them plus the
backoff between.
"""

if __name__ == "__main__":  # first, run as a tool: Ctrl-C, a missing module, reproducible MKL
    from polar_xtuner.entry import start_tool

    start_tool()

import json
import math
import os
import sys

from polar_xtuner.client import (
    DEFAULT_BATCH_TEXTS,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    SERVER_TYPES,
    parse_addresses,
)
from polar_xtuner.constants import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_RESPONSE_LENGTH,
    TEMPLATE_RESERVED_TOKENS,
)
from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.eval.benchmarks import FORMATS
from polar_xtuner.entry import cli, entry_point
from polar_xtuner.errors import UserError, VerificationError
from polar_xtuner.flags import ArgumentParser, float_in, int_at_least, non_empty
from polar_xtuner.hf_layout import TRUST_FLAG, check_model_dir, load_failure, remote_code_allowed
from polar_xtuner.outputs import atomic_file, check_writable, refuse_overlap, require_extension, write_json
from polar_xtuner.records import DataError, iter_records, record_answers


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=non_empty, help="HF POLAR model directory")
    p.add_argument("--data", required=True, type=non_empty,
                   help="records: .jsonl, .json, .parquet (pairs or groups, or a benchmark's rows: --format)")
    p.add_argument("--format", default="polar", choices=FORMATS,
                   help="how --data's rows are laid out: this project's records (default) or a public benchmark")
    p.add_argument("--references", type=non_empty,
                   help="a .jsonl of {\"id\", \"reference\"}: each row's reference by its id (needed by "
                        "rewardbench2; replaces a set's own)")
    p.add_argument("--allow-reference-match", action="store_true",
                   help="score groups whose reference equals one of their responses (refused by default: that "
                        "response then scores highest and inflates accuracy)")
    p.add_argument("--out", type=non_empty, help="write the report as JSON here")
    p.add_argument("--save-scores", type=non_empty, help="write one line of scores per record here")
    p.add_argument("--compare", type=non_empty, metavar="OTHER",
                   help="another model directory to score on the same records, or its --save-scores .jsonl")
    p.add_argument("--compare-server-address", type=non_empty,
                   help="with --server-type and a --compare directory: HOST:PORT serving the other model")
    p.add_argument("--batch-size", type=int_at_least(1),
                   help=f"sequences per forward pass (default {DEFAULT_EVAL_BATCH_SIZE}); with --server-type, the most "
                        f"texts per request (default {DEFAULT_BATCH_TEXTS})")
    p.add_argument("--max-length", type=int_at_least(TEMPLATE_RESERVED_TOKENS + 1), help=f"token budget per sequence (default: the model's, else {DEFAULT_MAX_LENGTH})")
    p.add_argument("--max-response-length", type=int_at_least(1),
                   help=f"cap for reference and answers (default: the model's, else {DEFAULT_MAX_RESPONSE_LENGTH})")
    p.add_argument("--plot", type=non_empty,
                   help="draw score distributions and the margin histogram (both models' with --compare) to this "
                        ".png, .svg or .pdf")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="local scoring: score every answer as a whole sequence (default: the answers of one "
                        "prompt and reference after one copy of it, the same scores within float rounding)")
    p.add_argument("--server-type", choices=SERVER_TYPES, help="score on a served model")
    p.add_argument("--server-address", default="127.0.0.1:30000", type=non_empty,
                   help="HOST:PORT of the server, or several comma-separated (requests are spread over them)")
    p.add_argument("--concurrency", type=int_at_least(1), default=DEFAULT_CONCURRENCY, help="requests in flight per server")
    p.add_argument("--batch-tokens", type=int_at_least(1), default=DEFAULT_BATCH_TOKENS,
                   help="the most tokens per server request; a longer text goes alone (text servers: "
                        "counted in characters, which bound the tokens)")
    p.add_argument("--write-stats", action="store_true",
                   help="save the scores' mean and std into the model dir (for RL reward normalisation)")
    p.add_argument("--timeout", type=float_in(0, low_open=True), default=DEFAULT_TIMEOUT_S,
                   help="seconds a server request may take in all (connecting, waiting and reading)")
    p.add_argument("--max-retries", type=int_at_least(1), default=DEFAULT_MAX_RETRIES, help="attempts per server request")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="run Python code in --model even when it is not the code this project ships "
                        "(converted models never need it)")
    args = p.parse_args(argv)  # numbers and paths are checked by their types (polar_xtuner/flags.py)
    for flag, value in (("--server-address", args.server_type and args.server_address),
                        ("--compare-server-address", args.compare_server_address)):
        if value:
            try:
                parse_addresses(value)
            except ValueError as e:
                p.error(f"{flag}: {e}")
    if args.compare_server_address and not args.server_type:
        p.error("--compare-server-address needs --server-type (without it --compare's model is scored here)")
    return args


def write_score_stats(model_dir: str, scores, data: str) -> str:
    """Mean and std of every score into MODEL_DIR/polar_reward_stats.json (atomically)."""
    import statistics

    from polar_xtuner.outputs import write_json
    from polar_xtuner.rft import STATS_FILE

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
        from transformers import AutoTokenizer

        from polar_xtuner.client import BadScoreError, RemoteSettings, TextTooLongError
        from polar_xtuner.eval.remote import check_served_dtype, score_answers_remote

        trust = remote_code_allowed(model_dir, args.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise load_failure(model_dir, "tokenizer", e) from None
        remote = RemoteSettings(args.server_type, server_address, timeout=args.timeout,
                                max_retries=args.max_retries, batch_size=args.batch_size or DEFAULT_BATCH_TEXTS,
                                batch_tokens=args.batch_tokens, concurrency=args.concurrency)
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
        from polar_xtuner.scoring import load_model, score_answers

        model, tokenizer = load_model(model_dir, trust_remote_code=args.trust_remote_code)
        scores = score_answers(model, tokenizer, records, settings.max_length, settings.max_response_length,
                               args.batch_size or DEFAULT_EVAL_BATCH_SIZE, progress=True,
                               share_prefix=args.share_prefix)
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
    try:
        rows = list(iter_records(path, validate=False))
    except DataError as e:
        raise UserError(f"--compare {e}") from None
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


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
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
    from polar_xtuner.eval.benchmarks import load_eval_records, load_references

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

    from polar_xtuner.eval.plot import plot_scores
    from polar_xtuner.eval.report import comparison, format_report, ranking_report

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
    report["share_prefix"] = not args.server_type and args.share_prefix
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
        check_writable(os.path.join(args.model, "polar_reward_stats.json"), "--write-stats")


if __name__ == "__main__":
    cli(main)
