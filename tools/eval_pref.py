"""Preference accuracy, best-of-N and MRR of a POLAR model, alone or against another model.

Usage:
    python tools/eval_pref.py --model PATH --data FILE [--format polar|verifybench|ppe|rewardbench2]
        [--references REFS.jsonl] [--allow-reference-match] [--out report.json]
        [--save-scores scores.jsonl] [--compare OTHER_MODEL_DIR|OTHER_SCORES.jsonl]
        [--compare-server-address HOST:PORT] [--plot FILE.png|.svg|.pdf] [--batch-size N]
        [--batch-tokens N] [--max-length N --max-response-length N]
        [--server-type sglang|vllm|lmdeploy --server-address HOST:PORT[,HOST:PORT...]]
        [--concurrency N] [--routing prefix|round_robin] [--write-stats]

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
    from polar_xtuner.cli.entry import start_tool

    start_tool()

from polar_xtuner.cli.entry import cli, entry_point
from polar_xtuner.cli.flags import ArgumentParser, float_in, int_at_least, non_empty
from polar_xtuner.constants import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_RESPONSE_LENGTH,
    TEMPLATE_RESERVED_TOKENS,
)
from polar_xtuner.eval.benchmarks import FORMATS
from polar_xtuner.hf_layout import TRUST_FLAG
from polar_xtuner.scoring.client import (
    DEFAULT_BATCH_TEXTS,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    SERVER_TYPES,
    parse_addresses,
)
from polar_xtuner.scoring.fleet import ROUTINGS


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
    p.add_argument("--no-shared-prefix", "--no-share-prefix", dest="shared_prefix", action="store_false",
                   help="local scoring: score every answer as a whole sequence (default: the answers of one "
                        "prompt and reference after one copy of it, the same scores within float rounding)")
    p.add_argument("--server-type", choices=SERVER_TYPES, help="score on a served model")
    p.add_argument("--server-address", default="127.0.0.1:30000", type=non_empty,
                   help="HOST:PORT of the server or of a fleet's router (tools/serve.sh --replicas N), or several "
                        "comma-separated; a record's answers are scored on one server")
    p.add_argument("--routing", choices=ROUTINGS, default="prefix",
                   help="over several servers: prefix (a record's answers on one, where its prefix is cached) or "
                        "round_robin (each answer to the next)")
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
    args = p.parse_args(argv)  # numbers and paths are checked by their types (polar_xtuner/cli/flags.py)
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


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    # Lazy: the run brings torch and transformers (seconds to import); a bad flag is refused before.
    from polar_xtuner.eval.run import evaluate

    return evaluate(args)


if __name__ == "__main__":
    cli(main)
