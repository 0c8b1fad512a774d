"""`make bench`'s local sections: packing, training, local scoring, the data builder, cached and tool starts.

Every speed figure is a ratio against a baseline measured in the same run,
the two sides interleaved (A, B, A, B ...) so that machine noise hits both
alike, and every section checks that its work happened before it returns
(:func:`bench.report.check`):

* :func:`padding_real_fraction`, :func:`packing_stats`: the share of real
  tokens per batch, padded against packed, on chat-like lengths (every token
  checked to land in a row);
* :func:`train_throughput`: training tokens/s of the tiny model, packed rows
  against padded batches of the same pairs (finite losses, every token in the row);
* :func:`eval_throughput`: local scoring pairs/s, batched and length-sorted
  against one pair at a time (the same scores both ways);
* :func:`data_build`: our dataset builder against xtuner's (the same token ids);
* :func:`startup`: a one-step ``xtuner train`` without and with the
  pre-tokenized cache (a checkpoint written; the cache read only where it should be);
* :func:`tool_start`: the CPU time of a fresh process that loads a model and scores a pair as
  eval_pref does, without torchvision against with it (the same score; torchvision imported
  only where it should be).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch
from datasets import load_dataset
from mmengine import MessageHub
from transformers import AutoConfig, AutoTokenizer
from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import PackedDatasetWrapper, build_preference_dataset

from bench import REPO
from bench.recipe_gradients import config_copy
from bench.report import check, check_scores
from bench.workloads import chat_like_lengths, pair_tokens, reward_model, synthetic_pairs
from polar_xtuner.data.dataset import build_polar_dataset
from polar_xtuner.demo.data import generate
from polar_xtuner.scoring.local import load_model, score_records

DEMO_CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")
# Local scores of one pair, batched with padding against alone: the same up to fp32 summation order.
SCORE_TOLERANCE = 1e-3
CACHE_HIT = "polar_xtuner: using cached encoded pairs"


def padding_real_fraction(lengths, pairs_per_batch: int) -> float:
    """Real tokens over padded slots when ``pairs_per_batch`` pairs are padded to their longest sequence."""
    real = padded = 0
    for i in range(0, len(lengths), pairs_per_batch):
        seqs = [x for pair in lengths[i:i + pairs_per_batch] for x in pair]
        real += sum(seqs)
        padded += len(seqs) * max(seqs)
    check(real == sum(c + r for c, r in lengths), "padding: not every pair landed in a batch")
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
    check(sum(rows) == sum(c + r for c, r in lengths), "packing: not every pair landed in a row")
    # one row per step: no pad tokens at all; fill is tokens / row budget
    return 1.0, sum(rows) / (len(rows) * max_packed_length)


def train_throughput(tiny_dir: str, steps: int, pairs_per_step: int = 8, max_length: int = 1024) -> dict:
    """Real tokens/s of forward+backward+AdamW, packed vs padded, the same pairs.

    Lengths follow the chat-like distribution, scaled to the tiny model's
    max_length, so padding wastes what it wastes on real data. The model is
    as the tiny CPU configs ship it (no activation checkpointing).
    """
    cfg = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)
    feats = synthetic_pairs(chat_like_lengths(pairs_per_step * steps, max_length, seed=1),
                            cfg.vocab_size, cfg.reward_token_id)
    hub = MessageHub.get_instance("varlen_attn_args")
    models = {"packed": reward_model(tiny_dir, True), "padded": reward_model(tiny_dir, False)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times = {"packed": [], "padded": []}
    tokens = []
    for step in range(steps):
        chunk = feats[step * pairs_per_step:(step + 1) * pairs_per_step]
        tokens.append(pair_tokens(chunk))
        row = PackedDatasetWrapper(chunk, max_packed_length=10 ** 9, shuffle_before_pack=False)[0]
        batches = {
            "packed": preference_collate_fn([row], use_varlen_attn=True)["data"],
            "padded": preference_collate_fn(chunk, use_varlen_attn=False)["data"],
        }
        check(batches["packed"]["input_ids"].numel() == tokens[-1],
              f"training step {step}: the packed row holds {batches['packed']['input_ids'].numel()} tokens "
              f"of the pairs' {tokens[-1]}")
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
            check(bool(torch.isfinite(loss.detach()).all()), f"training step {step} ({kind}): loss {loss.item()}")
    warm = 2  # first steps pay one-off allocation costs
    tok = sum(tokens[warm:])
    packed = tok / sum(times["packed"][warm:])
    padded = tok / sum(times["padded"][warm:])
    return {"train_tokens_per_s_packed": packed, "train_tokens_per_s_padded": padded,
            "train_speedup_packed_vs_padded": packed / padded}


def eval_throughput(tiny_dir: str, repeats: int = 5) -> dict:
    """Local scoring pairs/s of 200 demo pairs: batches of 32, length-sorted, against one pair at a time."""
    model, tok = load_model(tiny_dir, device="cpu")
    recs = list(generate(200, 1))
    runs = {"batched": [], "single": []}
    scores = {}
    for i in range(repeats):
        for kind in (("batched", "single") if i % 2 else ("single", "batched")):
            t0 = time.perf_counter()
            scores[kind] = score_records(model, tok, recs, 1024, 128, batch_size=32 if kind == "batched" else 1)
            runs[kind].append(time.perf_counter() - t0)
    for kind, got in scores.items():
        check_scores([s for pair in got for s in pair], 2 * len(recs), f"local scoring ({kind})")
    diff = max(abs(a - b) for x, y in zip(scores["batched"], scores["single"]) for a, b in zip(x, y))
    check(diff <= SCORE_TOLERANCE, f"local scoring: batched and single scores differ by {diff:.3g} "
                                   f"(tolerance {SCORE_TOLERANCE})")
    batched = len(recs) / statistics.median(runs["batched"])
    single = len(recs) / statistics.median(runs["single"])
    return {"eval_pairs_per_s": batched, "eval_pairs_per_s_single": single,
            "eval_speedup_batched_vs_single": batched / single}


def data_build(tiny_dir: str, data_file: str, n: int, rounds: int = 2) -> dict:
    """Validate + tokenize + pack n pairs: our builder vs xtuner's, same token ids.

    The two sides alternate for ``rounds`` rounds; each side's best time counts.
    """
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
    check(len(ours) > 0 and len(ours) == len(stock), f"data build: {len(ours)} rows ours, {len(stock)} xtuner's")
    for i in range(len(ours)):
        check(ours[i]["input_ids"] == stock[i]["input_ids"] and ours[i]["labels"] == stock[i]["labels"],
              f"data build: row {i} differs from xtuner's")
    return {"data_build_pairs_per_s": n / min(t_ours), "data_build_pairs_per_s_xtuner": n / min(t_stock),
            "data_build_speedup_vs_xtuner": min(t_stock) / min(t_ours), "data_build_pairs": n}


def startup(tiny_dir: str, data_file: str, rounds: int = 2) -> dict:
    """Wall time of `xtuner train` to its first step (one-step runs): no cache vs a warm cache.

    One cold run fills the cache; then the two sides alternate for ``rounds``
    rounds and each side's best time counts. Each run must leave its
    checkpoint, and only the cached side may read the cache.
    """
    tmp = os.path.dirname(data_file)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    loop = "train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)"
    one_step = "train_cfg = dict(type=TrainLoop, max_iters=1)"
    cache = os.path.join(tmp, "cache")

    def run(kind: str) -> float:
        cfg = config_copy(DEMO_CONFIG, tmp, f"polar_bench_startup_{kind}.py", pretrained_model_name_or_path=tiny_dir,
                          data_files=data_file, data_cache_dir=None if kind == "stock" else cache)
        with open(cfg, encoding="utf-8") as f:
            text = f.read()
        check(text.count(loop) == 1, f"the demo config has {text.count(loop)} lines `{loop}`, expected 1; "
                                     "update bench/cpu_sections.py")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(text.replace(loop, one_step))
        work = os.path.join(tmp, f"work_{kind}")
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run(["xtuner", "train", cfg, "--work-dir", work],
                              capture_output=True, text=True, env=env, cwd=REPO)
        seconds = time.perf_counter() - t0
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        check(os.path.exists(os.path.join(work, "last_checkpoint")),
              f"start-up run {kind} left no checkpoint (exit {proc.returncode}): {tail[0]}")
        hit = re.search(re.escape(CACHE_HIT), proc.stderr + proc.stdout) is not None
        check(hit == (kind == "cached"), f"start-up run {kind} {'read' if hit else 'did not read'} the cache")
        return seconds

    run("cold")
    times = {"stock": [], "cached": []}
    for r in range(rounds):
        for kind in (("stock", "cached") if r % 2 == 0 else ("cached", "stock")):
            times[kind].append(run(kind))
    stock, cached = min(times["stock"]), min(times["cached"])
    return {"startup_s_stock": stock, "startup_s_cached": cached, "startup_speedup_cached": stock / cached}


# A tool's model loading in a fresh interpreter (eval_pref's path: load_model, then one pair
# scored); "as before" imports transformers' model classes first, as a process that needs
# torchvision does, so that polar_xtuner.hf_layout.text_only_transformers finds them loaded.
_TOOL_START = """
import os, sys
{before}
from polar_xtuner.scoring.local import load_model, score_records
model, tok = load_model({model!r}, device="cpu")
pair = score_records(model, tok, [dict(prompt="q", reference="r", chosen="a", rejected="b")], 64, 16)[0]
t = os.times()
print("torchvision" in sys.modules, t.user + t.system, pair[0], pair[1])
"""


def tool_start(tiny_dir: str, rounds: int = 3) -> dict:
    """CPU seconds of a tool process's start: transformers' model classes without torchvision vs with it.

    The two sides alternate for ``rounds`` rounds; each side's median counts.
    Each run must score the same pair the same, and import torchvision only
    on the side that asks for it.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sides = {"text_only": "", "with_torchvision": "import transformers.modeling_utils"}
    cpu = {side: [] for side in sides}
    scores = set()
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            code = _TOOL_START.format(before=sides[side], model=tiny_dir)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
            last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
            error = (proc.stderr.strip().splitlines() or [last])[-1]
            check(proc.returncode == 0, f"tool start ({side}) failed: {error}")
            imported, seconds, chosen, rejected = last.split()
            check(imported == str(side == "with_torchvision"),
                  f"tool start ({side}): torchvision {'was' if imported == 'True' else 'was not'} imported")
            cpu[side].append(float(seconds))
            scores.add((chosen, rejected))
    check(len(scores) == 1, f"tool start: the two sides scored the pair differently: {sorted(scores)}")
    text_only, with_tv = statistics.median(cpu["text_only"]), statistics.median(cpu["with_torchvision"])
    return {"tool_start_cpu_s": text_only, "tool_start_cpu_s_with_torchvision": with_tv,
            "tool_start_speedup_text_only": with_tv / text_only}
