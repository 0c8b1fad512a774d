"""Preference accuracy of a POLAR model on prompt/reference/chosen/rejected pairs.

Usage:
    python tools/eval_pref.py --model PATH --data FILE.jsonl [--out report.json]
        [--save-scores scores.jsonl] [--batch-size N]
        [--max-length N --max-response-length N] [--plot FILE.png]
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
Exit codes: 0 done, 2 bad input (missing model or data, no valid pair),
3 the server failed (after bounded retries).
"""

import argparse
import contextlib
import json
import math
import os
import sys

from polar_xtuner.client import SERVER_TYPES, parse_addresses
from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.schema import DataError, iter_jsonl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF POLAR model directory")
    p.add_argument("--data", required=True, help="prompt/reference/chosen/rejected .jsonl")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--save-scores", help="write one line of scores per input record here")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-length", type=int, help="token budget per sequence (default: the model's, else 16384)")
    p.add_argument("--max-response-length", type=int,
                   help="cap for reference and answers (default: the model's, else 4096)")
    p.add_argument("--plot", help="draw score distributions and the margin histogram to this PNG")
    p.add_argument("--server-type", choices=SERVER_TYPES, help="score on a served model")
    p.add_argument("--server-address", default="127.0.0.1:30000",
                   help="HOST:PORT of the server, or several comma-separated (requests are spread over them)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    p.add_argument("--write-stats", action="store_true",
                   help="save the scores' mean and std into the model dir (for RL reward normalisation)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per server request")
    p.add_argument("--max-retries", type=int, default=3, help="attempts per server request")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_retries", "concurrency", "max_length", "max_response_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.timeout > 0:
        p.error("--timeout must be > 0")
    if args.server_type:
        try:
            parse_addresses(args.server_address)
        except ValueError as e:
            p.error(f"--server-address: {e}")
    return args


def write_score_stats(model_dir: str, scores, data: str) -> str:
    """Mean and std of every score into MODEL_DIR/polar_reward_stats.json (atomically)."""
    import statistics

    from polar_xtuner.rft import STATS_FILE

    flat = [s for pair in scores for s in pair]
    stats = {"mean": statistics.fmean(flat), "std": statistics.pstdev(flat), "n": len(flat), "data": data}
    path = os.path.join(model_dir, STATS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    needed = ["tokenizer_config.json"] if args.server_type else ["config.json", "adapter_config.json"]
    if not any(os.path.isfile(os.path.join(args.model, n)) for n in needed):
        print(f"error: --model {args.model}: not a model directory (no {' or '.join(needed)})", file=sys.stderr)
        return 2
    try:
        items = list(iter_jsonl(args.data))
    except DataError as e:
        print(f"error: --data {e}", file=sys.stderr)
        return 2
    problem = check_outputs(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        settings = EncodingSettings.from_model_dir(args.model).override(args.max_length, args.max_response_length)
    except ValueError as e:
        print(f"error: --model {e}", file=sys.stderr)
        return 2
    print(f"encoding: max_length {settings.max_length}, max_response_length {settings.max_response_length} "
          f"(from {settings.source})", file=sys.stderr)
    bad = [it for it in items if it.error is not None]
    for it in bad:
        print(f"skipped {it.where}: {it.error.reason}", file=sys.stderr)
    good = [it for it in items if it.record is not None]
    if not good:
        print(f"error: --data {args.data}: no valid pair to evaluate", file=sys.stderr)
        return 2

    from polar_xtuner.evaluate import format_report, load_model, plot_scores, preference_report, score_records

    records = [it.record for it in good]
    if args.server_type:
        from transformers import AutoTokenizer

        from polar_xtuner.client import RemoteScorer, RemoteScoringError, check_served_dtype, score_records_remote

        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
        scorer = RemoteScorer(args.server_type, args.server_address, os.path.basename(args.model.rstrip("/")),
                              timeout=args.timeout, max_retries=args.max_retries, batch_size=args.batch_size,
                              concurrency=args.concurrency)
        try:
            scores = score_records_remote(scorer, tokenizer, records, settings.max_length,
                                          settings.max_response_length)
            print(check_served_dtype(scorer, args.model), file=sys.stderr)
        except RemoteScoringError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    else:
        model, tokenizer = load_model(args.model)
        scores = score_records(model, tokenizer, records, settings.max_length, settings.max_response_length,
                               args.batch_size, progress=True)
    report = preference_report(scores, records)
    report["skipped"] = len(bad)
    report["model"] = args.model
    report["data"] = args.data
    report["backend"] = args.server_type or "local"
    report["encoding"] = {"max_length": settings.max_length, "max_response_length": settings.max_response_length,
                          "source": settings.source}
    for (c, r), rec_item in zip(scores, good):
        if not (math.isfinite(c) and math.isfinite(r)):
            print(f"error: {rec_item.where}: the model scored this pair {c}/{r}, not a finite number; "
                  f"nothing was written", file=sys.stderr)
            return 3
    print(format_report(report))
    # Each output goes to a temporary sibling and is renamed into place when complete.
    if args.plot:
        with atomic_path(args.plot) as tmp:
            plot_scores(scores, tmp)
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)  # strict JSON: no bare NaN
    if args.write_stats:
        path = write_score_stats(args.model, scores, args.data)
        print(f"wrote {path}", file=sys.stderr)
    if args.save_scores:
        by_line = {it.line: s for it, s in zip(good, scores)}
        with atomic_path(args.save_scores) as tmp, open(tmp, "w") as f:
            for it in items:
                s = by_line.get(it.line) if it.record is not None else None
                row = {"line": it.line, "chosen": s[0] if s else None, "rejected": s[1] if s else None}
                if s is None:
                    row["error"] = it.error.reason
                f.write(json.dumps(row) + "\n")
    return 0


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary sibling of path to write; renamed onto path only if the block succeeds."""
    stem, ext = os.path.splitext(os.path.basename(path))  # the extension stays last: it picks a plot's format
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{stem}.tmp-{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_outputs(args) -> str | None:
    """Refuse outputs that are an input or cannot be written, before any scoring. Returns an error or None."""
    inputs = {os.path.realpath(args.data)}
    model_dir = os.path.realpath(args.model)
    for flag in ("out", "save_scores", "plot"):
        path = getattr(args, flag)
        if not path:
            continue
        name = "--" + flag.replace("_", "-")
        real = os.path.realpath(path)
        if real in inputs or os.path.dirname(real) == model_dir:
            return f"{name} {path} would overwrite an input (--data, or a file of --model); choose another path"
        inputs.add(real)  # two outputs on one path would clobber each other
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            return f"{name} {path}: cannot create {parent} ({e.strerror})"
        if not os.access(parent, os.W_OK) or os.path.isdir(path):
            return f"{name} {path}: not writable"
    if args.write_stats and not os.access(args.model, os.W_OK):
        return f"--write-stats: {args.model} is not writable"
    return None


if __name__ == "__main__":
    sys.exit(main())
