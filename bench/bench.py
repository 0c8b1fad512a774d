"""Benchmarks of packing and evaluation on this machine (`make bench`).

Usage:
    python bench/bench.py [--out bench/results.json] [--steps 30]

Every speed figure is a ratio against a baseline measured in the same run,
interleaved (A, B, A, B ...) so that machine noise hits both sides alike:

* padding vs packing: the share of real (non-pad) tokens per batch on a
  long-tailed, chat-like length distribution (lognormal, clipped);
* training tokens/s of the tiny model on CPU, packed rows (varlen attention,
  the exact SDPA backend) vs padded batches of the same pairs, with lengths
  from the same distribution scaled to the tiny model's 1024 tokens;
* evaluation pairs/s of tools/eval_pref.py's scorer, batched and length-sorted
  vs one pair at a time;
* validating, tokenizing and packing N synthetic pairs with our builder vs
  xtuner's ``build_preference_dataset(is_reference=True)`` (token ids checked
  equal; two alternating rounds, best time of each side);
* wall time of a one-step ``xtuner train`` on the N-pair file without the
  pre-tokenized cache vs with a warm cache (two alternating rounds, best of each);
* remote scoring pairs/s against one vLLM server (the CPU build from
  .venv-serve, started as tools/serve.sh starts it): our client (batches in
  flight together) vs xtuner's ``RewardModelClient`` (POLAR's published
  client) on the same records, scores checked equal (rotating order, median
  of 3, the prefix cache emptied before each run), on short pairs, long pairs
  and RL groups of rollouts; the server's own time (pre-built ids), the
  ceiling of any client's speedup there; then all again against stock vLLM's
  per-token serving, the baseline of our vLLM plugin;
* peak memory of tools/convert.sh on a POLAR-1.8B-shaped random checkpoint
  (bench/convert_memory.py; fp32 and bf16 output) over one fp32 copy of the
  weights. It needs about 20 GB of disk and a few minutes.

Writes the JSON figures and prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

# Run as `python bench/bench.py`: the package is installed (editable) by `make setup`, and
# bench/ is the script's own directory, so its siblings import without sys.path edits.
from polar_xtuner.demo.data import generate


def chat_like_lengths(n: int, max_length: int, seed: int = 0) -> list[tuple[int, int]]:
    """(chosen, rejected) token lengths: shared prompt+reference, long-tailed answers."""
    rng = np.random.default_rng(seed)
    shared = np.clip(rng.lognormal(5.0, 1.0, n), 16, max_length // 2).astype(int)
    a = np.clip(rng.lognormal(5.0, 1.1, n), 4, max_length // 2).astype(int)
    b = np.clip(rng.lognormal(5.0, 1.1, n), 4, max_length // 2).astype(int)
    return [(int(s + x), int(s + y)) for s, x, y in zip(shared, a, b)]


def padding_real_fraction(lengths, pairs_per_batch: int) -> float:
    real = padded = 0
    for i in range(0, len(lengths), pairs_per_batch):
        seqs = [x for pair in lengths[i:i + pairs_per_batch] for x in pair]
        real += sum(seqs)
        padded += len(seqs) * max(seqs)
    return real / padded


def packing_stats(lengths, max_packed_length: int) -> tuple[float, float]:
    """(real-token share, row fill) of greedy packing as xtuner packs."""
    rows, cur = [], 0
    for c, r in lengths:
        if cur and cur + c + r > max_packed_length:
            rows.append(cur)
            cur = 0
        cur += c + r
    rows.append(cur)
    # one row per step: no pad tokens at all; fill is tokens / row budget
    return 1.0, sum(rows) / (len(rows) * max_packed_length)


def _model(tiny_dir, varlen):
    from polar_xtuner.train.model import PolarRewardModel

    torch.manual_seed(0)
    # as the tiny CPU configs ship it (activation_checkpointing = False): the figures compare layouts
    return PolarRewardModel.from_model_dir(tiny_dir, use_varlen_attn=varlen, use_activation_checkpointing=False,
                                           loss_type="ranking", penalty_type="none").train()


def synthetic_pairs(lengths, vocab_size: int, reward_token_id: int, seed: int = 0) -> list[dict]:
    """Pair features with the given token lengths (random ids, reward token last)."""
    rng = np.random.default_rng(seed)
    out = []
    for c, r in lengths:
        ids = [rng.integers(5, vocab_size, n - 1).tolist() + [reward_token_id] for n in (c, r)]
        out.append({"chosen_ids": ids[0], "rejected_ids": ids[1],
                    "chosen_labels": [-100] * (c - 1) + [0], "rejected_labels": [-100] * (r - 1) + [1]})
    return out


def train_throughput(tiny_dir, steps: int, pairs_per_step: int = 8, max_length: int = 1024) -> dict:
    """Real tokens/s of forward+backward+AdamW, packed vs padded, the same pairs.

    Lengths follow the chat-like distribution, scaled to the tiny model's
    max_length, so padding wastes what it wastes on real data.
    """
    from mmengine import MessageHub
    from transformers import AutoConfig
    from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
    from xtuner.dataset.preference_dataset import PackedDatasetWrapper

    cfg = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)
    feats = synthetic_pairs(chat_like_lengths(pairs_per_step * steps, max_length, seed=1),
                            cfg.vocab_size, cfg.reward_token_id)
    hub = MessageHub.get_instance("varlen_attn_args")
    models = {"packed": _model(tiny_dir, True), "padded": _model(tiny_dir, False)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times = {"packed": [], "padded": []}
    tokens = []
    for step in range(steps):
        chunk = feats[step * pairs_per_step:(step + 1) * pairs_per_step]
        tokens.append(sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in chunk))
        row = PackedDatasetWrapper(chunk, max_packed_length=10 ** 9, shuffle_before_pack=False)[0]
        batches = {
            "packed": preference_collate_fn([row], use_varlen_attn=True)["data"],
            "padded": preference_collate_fn(chunk, use_varlen_attn=False)["data"],
        }
        for kind in (("packed", "padded") if step % 2 else ("padded", "packed")):
            data = dict(batches[kind])
            if kind == "packed":
                hub.update_info("cumulative_len_rank_0", data.pop("cumulative_len")[0])
                hub.update_info("max_seqlen_rank_0", data.pop("max_seqlen"))
            t0 = time.perf_counter()
            loss = models[kind](data, mode="loss")["loss"]
            loss.backward()
            opts[kind].step()
            opts[kind].zero_grad()
            times[kind].append(time.perf_counter() - t0)
            hub.update_info("cumulative_len_rank_0", None)
    warm = 2  # first steps pay one-off allocation costs
    tok = sum(tokens[warm:])
    packed = tok / sum(times["packed"][warm:])
    padded = tok / sum(times["padded"][warm:])
    return {"train_tokens_per_s_packed": packed, "train_tokens_per_s_padded": padded,
            "train_speedup_packed_vs_padded": packed / padded}


def data_build(tiny_dir, data_file: str, n: int, rounds: int = 2) -> dict:
    """Validate + tokenize + pack n pairs: our builder vs xtuner's, same token ids.

    The two sides alternate for ``rounds`` rounds; each side's best time counts.
    """
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from xtuner.dataset.preference_dataset import build_preference_dataset

    from polar_xtuner.data.dataset import build_polar_dataset

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    kw = dict(max_length=1024, max_response_length=128, use_varlen_attn=True, max_packed_length=2048,
              shuffle_before_pack=False)
    t_ours, t_stock = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ours = build_polar_dataset(data_file, tok, reward_token_id=4, cache_dir=None, **kw)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stock = build_preference_dataset(
            dataset=dict(type=load_dataset, path="json", data_files=data_file), tokenizer=tok,
            dataset_map_fn=None, is_dpo=False, is_reward=True, reward_token_id=4, is_reference=True,
            num_proc=os.cpu_count(), **kw)
        t_stock.append(time.perf_counter() - t0)
    assert len(ours) == len(stock), (len(ours), len(stock))
    for i in range(len(ours)):
        assert ours[i]["input_ids"] == stock[i]["input_ids"] and ours[i]["labels"] == stock[i]["labels"], i
    return {"data_build_pairs_per_s": n / min(t_ours), "data_build_pairs_per_s_xtuner": n / min(t_stock),
            "data_build_speedup_vs_xtuner": min(t_stock) / min(t_ours), "data_build_pairs": n}


def startup(tiny_dir, data_file: str, rounds: int = 2) -> dict:
    """Wall time of `xtuner train` to its first step (one-step runs): no cache vs a warm cache.

    One cold run fills the cache; then the two sides alternate for ``rounds``
    rounds and each side's best time counts.
    """
    import re
    import shutil
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(repo, "configs", "POLAR_tiny_full_varlenattn_demo.py"), encoding="utf-8").read()
    tmp = os.path.dirname(data_file)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    def run(kind: str, cache: str | None) -> float:
        cfg_text = text
        for key, value in (("pretrained_model_name_or_path", tiny_dir), ("data_files", data_file),
                           ("data_cache_dir", cache)):
            cfg_text, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", cfg_text, flags=re.M)
            if n != 1:
                raise RuntimeError(f"the demo config has {n} lines `{key} = ...`, expected 1; update bench/bench.py")
        old_loop = "train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)"
        if cfg_text.count(old_loop) != 1:
            raise RuntimeError(f"the demo config has {cfg_text.count(old_loop)} lines `{old_loop}`, expected 1; "
                               "update bench/bench.py")
        cfg_text = cfg_text.replace(old_loop, "train_cfg = dict(type=TrainLoop, max_iters=1)")
        cfg = os.path.join(tmp, f"polar_bench_startup_{kind}.py")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(cfg_text)
        work = os.path.join(tmp, f"work_{kind}")
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run(["xtuner", "train", cfg, "--work-dir", work],
                              capture_output=True, text=True, env=env, cwd=repo)
        seconds = time.perf_counter() - t0
        if not os.path.exists(os.path.join(work, "last_checkpoint")):
            raise RuntimeError(f"startup run {kind} failed:\n{proc.stderr[-2000:]}")
        return seconds

    cache = os.path.join(tmp, "cache")
    run("cold", cache)
    times = {"stock": [], "cached": []}
    for r in range(rounds):
        for kind in (("stock", "cached") if r % 2 == 0 else ("cached", "stock")):
            times[kind].append(run(kind, cache if kind == "cached" else None))
    stock, cached = min(times["stock"]), min(times["cached"])
    return {"startup_s_stock": stock, "startup_s_cached": cached, "startup_speedup_cached": stock / cached}


def eval_throughput(tiny_dir, repeats: int = 5) -> dict:
    from polar_xtuner.scoring.local import load_model, score_records

    model, tok = load_model(tiny_dir, device="cpu")
    recs = list(generate(200, 1))
    runs = {"batched": [], "single": []}
    for i in range(repeats):
        for kind in (("batched", "single") if i % 2 else ("single", "batched")):
            t0 = time.perf_counter()
            score_records(model, tok, recs, 1024, 128, batch_size=32 if kind == "batched" else 1)
            runs[kind].append(time.perf_counter() - t0)
    batched = len(recs) / statistics.median(runs["batched"])
    single = len(recs) / statistics.median(runs["single"])
    return {"eval_pairs_per_s": batched, "eval_pairs_per_s_single": single,
            "eval_speedup_batched_vs_single": batched / single}


def demo_vocab() -> list[str]:
    """The demo answers' ASCII words, sorted: the vocabulary the synthetic long texts are drawn from."""
    from polar_xtuner.demo.data import TOPICS

    return sorted({w for answers, *_ in TOPICS.values() for w in answers if w.isascii()})


def long_records(n: int, seed: int, words: int = 300) -> list[dict]:
    """Demo records made long, each with a prompt and reference of its own.

    Every prompt opens with a context of ``words`` random words and every
    reference with a reasoning of ``words // 2``, drawn per record, so two
    records share no more than the start of the template, and only a pair's
    chosen and rejected texts share a long prefix, as an RL prompt's
    rollouts do. About 780 tokens per text with the tiny tokenizer.
    """
    rng = random.Random(seed)
    vocab = demo_vocab()
    out = []
    for rec in generate(n, seed):  # fresh records: edited in place
        context = " ".join(rng.choice(vocab) for _ in range(words))
        reasoning = " ".join(rng.choice(vocab) for _ in range(words // 2))
        rec["prompt"][-1]["content"] = f"Context: {context}. {rec['prompt'][-1]['content']}"
        rec["reference"][-1]["content"] = f"Reasoning: {reasoning}. {rec['reference'][-1]['content']}"
        out.append(rec)
    return out


def rollout_groups(n_prompts: int, n_rollouts: int, seed: int, words: int = 200) -> tuple[list, list, list]:
    """RL-shaped scoring work: ``n_rollouts`` responses per prompt, all against its reference.

    As in a GRPO step, the rollouts of one prompt share the whole
    ``prompt + reference + prompt`` part of their texts and differ only in
    the response. Each prompt opens with ``words`` random words of context,
    its reference with ``words // 3`` of reasoning and each response with
    ``words // 3`` of its own; about 600 tokens per text with the tiny
    tokenizer. Returns flat (prompts, references, responses), a prompt's
    rollouts next to each other, the order an RL batch arrives in.
    """
    rng = random.Random(seed)
    vocab = demo_vocab()

    def say(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    prompts, references, responses = [], [], []
    for rec in generate(n_prompts, seed):
        prompt = [{"role": "user", "content": f"Context: {say(words)}. {rec['prompt'][-1]['content']}"}]
        reference = [{"role": "assistant", "content": f"Reasoning: {say(words // 3)}. {rec['reference'][-1]['content']}"}]
        for i in range(n_rollouts):
            answer = rec["chosen" if i % 2 else "rejected"][-1]["content"]
            prompts.append(prompt)
            references.append(reference)
            responses.append(f"{say(words // 3)}. {answer}")
    return prompts, references, responses


# Record sets of the remote benchmark: key prefix, the unit counted, and how
# the records are cut (the same lengths for both clients).
REMOTE_SETS = {"short": ("remote", "pairs"), "long": ("remote_long", "pairs"), "rl": ("remote_rl", "rollouts")}
REMOTE_MAX_LENGTH, REMOTE_MAX_RESPONSE_LENGTH = 1024, 128


def _remote_round(tiny_dir, work: dict, pooler: str | None, repeats: int,
                  engine_args: tuple = ()) -> tuple[dict, dict]:
    """Median seconds per client and set against one vLLM server started as tools/serve.sh starts it.

    ``work`` maps a name of :data:`REMOTE_SETS` to its records (pair sets)
    or to (prompts, references, responses) (the RL set). Three runs per set:

    * ``ours``: the public path from records to scores, the one
      ``eval_pref --server-type vllm`` takes for pairs and the RL reward
      functions take for rollouts (:class:`polar_xtuner.rft.PolarReward`);
    * ``polar``: xtuner's ``RewardModelClient`` called once on all of them,
      as POLAR's verl recipe calls it per batch;
    * ``server_only``: our scorer sending ids built before the clock starts,
      the server's own time: no client can score these faster against this
      server, so ``polar / server_only`` bounds any client's speedup.

    ``pooler`` overrides the server's pooler config (None: serve.sh's);
    ``engine_args`` go to the engine after serve.sh's own. The
    prefix cache is emptied before every timed run, so each run computes
    what a first scoring of these texts computes. Returns the times and our
    client's scores per set (checked equal to POLAR's client's).
    """
    import subprocess

    from transformers import AutoTokenizer
    from xtuner.utils import RewardModelClient

    from polar_xtuner.scoring.client import RemoteScorer, post_json
    from polar_xtuner.encoding import PolarEncoder, pair_items
    from polar_xtuner.scoring.remote import score_records_remote
    from polar_xtuner.rl.reward import PolarReward, RFTSettings
    from polar_xtuner.serve.launcher import CPU_SERVE_VENV, engine_command, engine_env, stop, wait_ready
    from polar_xtuner.train.launch import free_port

    python = os.path.join(CPU_SERVE_VENV, "bin", "python")
    if not os.path.exists(python):
        raise RuntimeError(f"no vLLM CPU build at {CPU_SERVE_VENV}; run `make serve-setup`")
    lengths = (REMOTE_MAX_LENGTH, REMOTE_MAX_RESPONSE_LENGTH)
    port = free_port()
    extra = (["--pooler-config", pooler] if pooler else []) + list(engine_args)
    cmd = engine_command("vllm", tiny_dir, "127.0.0.1", port, python, extra, max_model_len=REMOTE_MAX_LENGTH, cpu=True)
    log = open(os.path.join(os.path.dirname(tiny_dir), "vllm_bench.log"), "w")
    proc = subprocess.Popen(cmd, env=engine_env("vllm", "127.0.0.1", False), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    times, scores = {}, {}
    try:
        wait_ready(base + "/health", proc, timeout=900)
        tok = AutoTokenizer.from_pretrained(tiny_dir)
        theirs = RewardModelClient(tiny_dir, *lengths, response_cut_side="right", server_type="vllm",
                                   server_address=f"127.0.0.1:{port}")
        for name, recs in work.items():
            if REMOTE_SETS[name][1] == "pairs":
                scorer = RemoteScorer("vllm", f"127.0.0.1:{port}")  # eval_pref's defaults
                enc = PolarEncoder(tok, *lengths)
                data = [{"prompt": r["prompt"], "reference": r["reference"], "output": r[k]}
                        for r in recs for k in ("chosen", "rejected")]
                ids = enc.serving_inputs(pair_items(recs), scorer.server_type)

                def ours(recs=recs, scorer=scorer):
                    return [s for pair in score_records_remote(scorer, tok, recs, *lengths) for s in pair]
            else:
                prompts, references, responses = recs
                reward = PolarReward(RFTSettings(server_address=f"127.0.0.1:{port}", model=tiny_dir), tokenizer=tok)
                scorer = reward.scorer
                data = [{"prompt": p, "reference": r, "output": c} for p, r, c in zip(*recs)]
                ids = reward.inputs(*recs)

                def ours(recs=recs, reward=reward):
                    return reward.score(*recs)

            ours()  # warm every path once
            theirs(data[:16])
            runs = {"ours": [], "polar": [], "server_only": []}
            kinds = list(runs)
            for i in range(repeats):
                for kind in kinds[i % 3:] + kinds[:i % 3]:  # each goes first once in three
                    status, body = post_json(base + "/reset_prefix_cache", {}, 60)  # VLLM_SERVER_DEV_MODE
                    if status != 200:
                        raise RuntimeError(f"vLLM refused /reset_prefix_cache: HTTP {status} {body[:200]!r}")
                    t0 = time.perf_counter()
                    if kind == "ours":
                        got = ours()
                    elif kind == "polar":
                        ref = theirs(data)
                    else:
                        scorer.score(ids)
                    runs[kind].append(time.perf_counter() - t0)
            if ref is None or len(ref) != len(got) or max(abs(a - b) for a, b in zip(got, ref)) > 1e-4:
                raise RuntimeError(f"{name}: our client and POLAR's disagree on the same server's scores")
            times[name] = {k: statistics.median(v) for k, v in runs.items()}
            scores[name] = got
    finally:
        stop(proc)
        log.close()
    return times, scores


def remote_throughput(tiny_dir, n_pairs: int = 1000, n_long: int = 200, n_groups: int = 32, n_rollouts: int = 8,
                      repeats: int = 3, engine_args: tuple = ()) -> dict:
    """Pairs (or rollouts)/s of our remote scoring vs POLAR's client against real vLLM servers.

    Three workloads (:data:`REMOTE_SETS`): the demo's short pairs
    (``remote_*``, about 40 tokens a text), long pairs (``remote_long_*``,
    about 780) and RL-shaped groups of rollouts (``remote_rl_*``, 8 per
    prompt, about 600 tokens). Each against the server tools/serve.sh starts
    (with our vLLM plugin: last-token scores, prefix caching) and against
    stock vLLM's per-token serving of the same model (``*_stock_vllm``,
    ``"task": "token_classify"``), the plugin's baseline in the same run.
    ``*_ceiling_vs_polar_client`` is POLAR's client's time over the server's
    own (see :func:`_remote_round`): the most any client could gain there.
    ``engine_args`` are passed to both servers (the tests' ``--enforce-eager``).
    """
    from polar_xtuner.encoding import EncodingSettings

    # As tools/convert.sh leaves a model: its lengths recorded, which the RL reward reads.
    EncodingSettings(REMOTE_MAX_LENGTH, REMOTE_MAX_RESPONSE_LENGTH).save(tiny_dir)
    work = {"short": list(generate(n_pairs, 11)), "long": long_records(n_long, 12),
            "rl": rollout_groups(n_groups, n_rollouts, 13)}
    served, got = _remote_round(tiny_dir, work, None, repeats, engine_args)
    stock, got_stock = _remote_round(tiny_dir, work, json.dumps({"use_activation": False, "task": "token_classify"}),
                                     repeats, engine_args)
    out = {}
    for name, (key, unit) in REMOTE_SETS.items():
        if max(abs(a - b) for a, b in zip(got[name], got_stock[name])) > 1e-4:
            raise RuntimeError(f"{name}: last-token and per-token serving disagree on the scores")
        n = len(work[name]) if unit == "pairs" else len(work[name][0])
        for suffix, t in (("", served[name]), ("_stock_vllm", stock[name])):
            out[f"{key}_{unit}_per_s{suffix}"] = n / t["ours"]
            out[f"{key}_{unit}_per_s_polar_client{suffix}"] = n / t["polar"]
            out[f"{key}_speedup_vs_polar_client{suffix}"] = t["polar"] / t["ours"]
            out[f"{key}_{unit}_per_s_server_only{suffix}"] = n / t["server_only"]
            out[f"{key}_ceiling_vs_polar_client{suffix}"] = t["polar"] / t["server_only"]
        out[f"{key}_plugin_speedup"] = stock[name]["ours"] / served[name]["ours"]
        out[f"{key}_plugin_speedup_polar_client"] = stock[name]["polar"] / served[name]["polar"]
    return out


def write_results(results: dict, path: str, device: str | None = None) -> None:
    """Add the machine and date, write the JSON and print a Markdown table of it."""
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results["machine"] = f"{device}, {machine}" if device else machine
    results["date"] = time.strftime("%Y-%m-%d")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("| figure | value |\n|---|---|")
    for k, v in results.items():
        print(f"| `{k}` | {v:.3f} |" if isinstance(v, float) else f"| `{k}` | {v} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))
    p.add_argument("--steps", type=int, default=30, help="training steps per side")
    p.add_argument("--pairs", type=int, default=100000, help="synthetic pairs for the data benchmarks")
    p.add_argument("--skip-data", action="store_true", help="skip the (minutes-long) data benchmarks")
    p.add_argument("--skip-serve", action="store_true", help="skip the real-vLLM remote scoring benchmark")
    p.add_argument("--skip-shared-prefix", action="store_true",
                   help="skip shared prefixes against whole sequences (bench/shared_prefix.py)")
    p.add_argument("--convert-shape", default="1.8b", choices=["1.8b", "tiny", "none"],
                   help="model shape for the conversion-memory benchmark (none: skip it)")
    args = p.parse_args(argv)

    from polar_xtuner.demo.tiny_model import make_tiny_model

    results = {}
    lengths = chat_like_lengths(20000, 16384)
    results["padding_real_token_fraction"] = padding_real_fraction(lengths, pairs_per_batch=4)
    results["packing_real_token_fraction"], results["packing_row_fill"] = packing_stats(lengths, 32768)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model(os.path.join(tmp, "tiny"))
        results.update(train_throughput(tiny, args.steps))
        results.update(eval_throughput(tiny))
        if not args.skip_shared_prefix:
            import shared_prefix

            results.update(shared_prefix.run(tiny))
        if not args.skip_serve:
            results.update(remote_throughput(tiny))
        if not args.skip_data:
            from polar_xtuner.demo.data import write_jsonl

            data_file = os.path.join(tmp, "pairs.jsonl")
            write_jsonl(data_file, generate(args.pairs, 5))
            results.update(data_build(tiny, data_file, args.pairs))
            results.update(startup(tiny, data_file))
    if args.convert_shape != "none":
        from convert_memory import measure

        with tempfile.TemporaryDirectory(prefix="polar_convert_mem_") as work:
            mem = measure(args.convert_shape, work)
        results.update({k: v for k, v in mem.items() if k.startswith("convert_")})
        results["convert_shape_params"] = mem["params"]
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
