"""Preference accuracy of a POLAR model on prompt/reference/chosen/rejected pairs.

Usage:
    python tools/eval_pref.py --model PATH --data FILE.jsonl [--out report.json]
        [--save-scores scores.jsonl] [--batch-size N] [--batch-tokens N]
        [--max-length N --max-response-length N] [--plot FILE.png|.svg|.pdf]
        [--server-type sglang|vllm|lmdeploy --server-address HOST:PORT[,HOST:PORT...]]
        [--concurrency N] [--write-stats]

A pair counts as correct when the chosen answer outscores the rejected one
under the same reference. Invalid records are reported (file:line: reason) and
skipped. With --server-type the scores come from a served model and --model
only provides the tokenizer and the encoding lengths. The lengths default to
the ones the converter saved in the model directory (polar_encoding.json), so
sequences are truncated as in training; --max-length / --max-response-length
override them. --write-stats saves the mean and std of all the scores (chosen
and rejected) into the model directory (polar_reward_stats.json), for the RL
reward functions' POLAR_NORMALIZE=1 (polar_xtuner/rft.py).
A directory's Python code runs only when it is the code this project ships
(every converted model), or with --trust-remote-code.
Exit codes: 0 done, 2 bad input or environment (missing model or data, no
valid pair, an output over an input, not writable or named with another
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
from polar_xtuner.entry import cli, entry_point
from polar_xtuner.errors import UserError, VerificationError
from polar_xtuner.flags import ArgumentParser, float_in, int_at_least, non_empty
from polar_xtuner.hf_layout import TRUST_FLAG, check_model_dir, load_failure, remote_code_allowed
from polar_xtuner.outputs import atomic_file, check_writable, refuse_overlap, require_extension, write_json
from polar_xtuner.records import DataError, iter_records


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=non_empty, help="HF POLAR model directory")
    p.add_argument("--data", required=True, type=non_empty, help="prompt/reference/chosen/rejected .jsonl")
    p.add_argument("--out", type=non_empty, help="write the report as JSON here")
    p.add_argument("--save-scores", type=non_empty, help="write one line of scores per input record here")
    p.add_argument("--batch-size", type=int_at_least(1),
                   help=f"sequences per forward pass (default {DEFAULT_EVAL_BATCH_SIZE}); with --server-type, the most "
                        f"texts per request (default {DEFAULT_BATCH_TEXTS})")
    p.add_argument("--max-length", type=int_at_least(TEMPLATE_RESERVED_TOKENS + 1), help=f"token budget per sequence (default: the model's, else {DEFAULT_MAX_LENGTH})")
    p.add_argument("--max-response-length", type=int_at_least(1),
                   help=f"cap for reference and answers (default: the model's, else {DEFAULT_MAX_RESPONSE_LENGTH})")
    p.add_argument("--plot", type=non_empty, help="draw score distributions and the margin histogram to this .png, .svg or .pdf")
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
    if args.server_type:
        try:
            parse_addresses(args.server_address)
        except ValueError as e:
            p.error(f"--server-address: {e}")
    return args


def write_score_stats(model_dir: str, scores, data: str) -> str:
    """Mean and std of every score into MODEL_DIR/polar_reward_stats.json (atomically)."""
    import statistics

    from polar_xtuner.outputs import write_json
    from polar_xtuner.rft import STATS_FILE

    flat = [s for pair in scores for s in pair]
    stats = {"mean": statistics.fmean(flat), "std": statistics.pstdev(flat), "n": len(flat), "data": data}
    path = os.path.join(model_dir, STATS_FILE)
    write_json(path, stats)
    return path


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    check_model_dir(args.model, weights=not args.server_type)  # served: --model gives the tokenizer only
    check_outputs(args)  # before reading or scoring anything
    try:
        items = list(iter_records(args.data))
    except DataError as e:
        raise UserError(f"--data {e}") from None
    try:
        settings = EncodingSettings.from_model_dir(args.model).override(args.max_length, args.max_response_length)
    except ValueError as e:
        raise UserError(f"--model {e}") from None
    trust = remote_code_allowed(args.model, args.trust_remote_code)
    print(f"encoding: max_length {settings.max_length}, max_response_length {settings.max_response_length} "
          f"(from {settings.source})", file=sys.stderr)
    bad = [it for it in items if it.error is not None]
    for it in bad:
        print(f"skipped {it.where}: {it.error.reason}", file=sys.stderr)
    good = [it for it in items if it.record is not None]
    if not good:
        raise UserError(f"--data {args.data}: no valid pair to evaluate")

    from polar_xtuner.eval.plot import plot_scores
    from polar_xtuner.eval.report import format_report, preference_report
    from polar_xtuner.scoring import load_model, score_records

    records = [it.record for it in good]
    if args.server_type:
        from transformers import AutoTokenizer

        from polar_xtuner.client import BadScoreError, RemoteSettings, TextTooLongError
        from polar_xtuner.eval.remote import check_served_dtype, score_records_remote

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=trust)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise load_failure(args.model, "tokenizer", e) from None
        remote = RemoteSettings(args.server_type, args.server_address, timeout=args.timeout,
                                max_retries=args.max_retries, batch_size=args.batch_size or DEFAULT_BATCH_TEXTS,
                                batch_tokens=args.batch_tokens, concurrency=args.concurrency)
        scorer = remote.scorer(model_name=os.path.basename(args.model.rstrip("/")))
        try:
            scores = score_records_remote(scorer, tokenizer, records, settings.max_length,
                                          settings.max_response_length)
        except TextTooLongError as e:  # the lengths in use say which --max-length would fit
            raise TextTooLongError(f"{e} (texts are cut to {settings.max_length} tokens now, from "
                                   f"{settings.source})") from None
        except BadScoreError as e:  # texts go chosen, rejected per record
            where = good[e.index // 2].where
            raise VerificationError(f"{where}: the server answered a {e.kind} score ({e.value!r}) for its "
                                    f"{('chosen', 'rejected')[e.index % 2]} answer; nothing was written") from None
        print(check_served_dtype(scorer, args.model), file=sys.stderr)
    else:
        model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
        scores = score_records(model, tokenizer, records, settings.max_length, settings.max_response_length,
                               args.batch_size or DEFAULT_EVAL_BATCH_SIZE, progress=True,
                               share_prefix=args.share_prefix)
    for (c, r), rec_item in zip(scores, good):
        if not (math.isfinite(c) and math.isfinite(r)):
            raise VerificationError(f"{rec_item.where}: the model scored this pair {c}/{r}, not a finite "
                                    f"number; nothing was written")
    report = preference_report(scores, records)
    report["skipped"] = len(bad)
    report["model"] = args.model
    report["data"] = args.data
    report["backend"] = args.server_type or "local"
    report["share_prefix"] = not args.server_type and args.share_prefix
    report["encoding"] = {"max_length": settings.max_length, "max_response_length": settings.max_response_length,
                          "source": settings.source}
    print(format_report(report))
    # Each output goes to a temporary sibling and is renamed into place when complete.
    if args.plot:
        with atomic_file(args.plot) as tmp:
            plot_scores(scores, tmp)
    if args.out:
        write_json(args.out, report)  # strict JSON: no bare NaN
    if args.write_stats:
        path = write_score_stats(args.model, scores, args.data)
        print(f"wrote {path}", file=sys.stderr)
    if args.save_scores:
        by_line = {it.line: s for it, s in zip(good, scores)}
        with atomic_file(args.save_scores) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for it in items:
                s = by_line.get(it.line) if it.record is not None else None
                row = {"line": it.line, "chosen": s[0] if s else None, "rejected": s[1] if s else None}
                if s is None:
                    row["error"] = it.error.reason
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
    refuse_overlap(outputs, [("--data", args.data), ("--model", args.model)])
    for flag, path in outputs:
        if path:
            check_writable(path, flag)
            require_extension(path, flag, OUTPUT_EXTENSIONS[flag])
    if args.write_stats:
        check_writable(os.path.join(args.model, "polar_reward_stats.json"), "--write-stats")


if __name__ == "__main__":
    cli(main)
