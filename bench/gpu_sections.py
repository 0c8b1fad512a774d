"""The GPU sections: ZeRO training, packed against padded rows, and scoring, on a POLAR-shaped model.

Used by `make bench-gpu` (:mod:`bench.gpu_suite`) and the GPU check's steps
(:mod:`bench.gpu_steps`); each runs on CPU too (the tiny shape), as the tests
and the check's CPU smoke run them. Every section checks its work before it
returns a figure: finite losses, every token of the rows trained, a score
for every sequence.

FLOPs per trained token (model FLOPs; the recomputation of activation
checkpointing is not counted, as MFU is defined)::

    6 N + 12 L d c

N: weights a token is multiplied through (every matrix but the input
embedding; 1.51e9 of POLAR-1.8B's 1.70e9 parameters),
L: layers, d: attention width (heads x head dim), c: a token's mean causal
context within its own sample, sum(s (s + 1) / 2) / sum(s) over the row's
samples s (varlen attention attends within a sample only). MFU is achieved
FLOP/s over the GPU's dense bf16 peak, by its exact name (989 TFLOP/s for
H100/H200 SXM, 835.5 for the NVL parts, 756 for H100 PCIe;
``--peak-tflops`` otherwise).
"""

from __future__ import annotations

import json
import os
import time

import torch
from mmengine import MessageHub
from transformers import AutoConfig, AutoModel
from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import PackedDatasetWrapper

from bench import REPO
from bench.report import check, check_scores
from bench.workloads import chat_like_lengths, pair_tokens, reward_model, synthetic_pairs
from polar_xtuner.precision import bf16_supported, eval_dtype
from polar_xtuner.scoring.local import load_model, score_ids

# Dense bf16 peaks (NVIDIA's data sheets, half the sparse figure) by the name torch reports, the
# most specific first: the PCIe and NVL parts of a chip run lower clocks and power than its SXM part
# ("NVIDIA H100 80GB HBM3" and "NVIDIA H200" are SXM).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H800 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5),
    ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("A100", 312.0), ("A800", 312.0),
)


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (:data:`PEAK_BF16_TFLOPS`), or None when unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def peak_tflops(device: str, given: float | None) -> float | None:
    """Dense bf16 peak of the device, from --peak-tflops or the GPU's name; None (no MFU) when unknown."""
    if given:
        return given
    return peak_for_name(torch.cuda.get_device_name()) if device == "cuda" else None


def matmul_params(config) -> int:
    """Weights a token is multiplied through: every matrix but the input embedding.

    The embedding is a lookup and norm scales are element-wise, so neither
    counts in 6 N (the value head, a 1 x d matrix, does).
    """
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n)


def row_flops(n_params: int, config, sample_lengths) -> float:
    """Model FLOPs of one training step over a packed row: 6 N T + 12 L d sum(s (s + 1) / 2)."""
    d = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    tokens = sum(sample_lengths)
    causal_pairs = sum(s * (s + 1) / 2 for s in sample_lengths)
    return 6 * n_params * tokens + 12 * config.num_hidden_layers * d * causal_pairs


def packed_rows(config, steps: int, max_length: int) -> list[dict]:
    """``steps`` packed rows (2 x max_length tokens) of chat-like random pairs, collated."""
    lengths = chat_like_lengths(400 * steps, max_length, seed=2)
    feats = synthetic_pairs(lengths, config.vocab_size, config.reward_token_id)
    packed = PackedDatasetWrapper(feats, max_packed_length=2 * max_length, shuffle_before_pack=False)
    check(len(packed) >= steps, f"{len(packed)} packed rows for {steps} steps")
    return [preference_collate_fn([packed[i]], use_varlen_attn=True)["data"] for i in range(steps)]


def ds_config(stage: str, device: str) -> dict:
    """configs/deepspeed/polar_zero{stage}[_cpu].json with xtuner's "auto" values filled."""
    name = f"polar_zero{stage}{'_cpu' if device == 'cpu' else ''}.json"
    with open(os.path.join(REPO, "configs", "deepspeed", name)) as f:
        cfg = json.load(f)
    # what xtuner fills in from the config: batch 1, accumulation 1 here, max_norm 1
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=1.0)
    if cfg.get("bf16", {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = bf16_supported(device)
    return cfg


def _distributed_env(port: str) -> None:
    # one process, its own rank 0: DeepSpeed's initialize reads these
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", port))


def train_stage(model_dir: str, stage: str, steps: int, device: str, max_length: int, profile: bool = False,
                save_dir: str | None = None) -> dict:
    """Tokens/s, model FLOP/s and peak memory of ``steps`` DeepSpeed steps (this process).

    Args:
        profile: Run one more step under the PyTorch profiler and report the
            kernels that took the most device time.
        save_dir: Save the DeepSpeed checkpoint there afterwards, as
            ``iter_1.pth/`` (the layout xtuner's runs write and the converter reads).

    Raises:
        CheckFailed: a loss was not finite, or the checkpoint was not written.
    """
    _distributed_env("29541")
    import deepspeed  # seconds to import, and it reads the environment just set

    on_gpu = device == "cuda"
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    rows = packed_rows(config, steps, max_length)
    n_params = matmul_params(config)
    # CPU tensors run SDPA whatever the machine has; name that backend, not the machine's best
    model = reward_model(model_dir, True, use_activation_checkpointing=True,
                         varlen_attn_backend=None if on_gpu else "sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, device),
                                      dist_init_required=True)
    hub = MessageHub.get_instance("varlen_attn_args")
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens, flops = [], [], []
    for row in rows:
        cu = row["cumulative_len"][0]
        loss, seconds = timed_step(engine, feed(row, hub, engine.device))
        times.append(seconds)
        sample_lengths = (cu[1:] - cu[:-1]).tolist()
        tokens.append(sum(sample_lengths))
        flops.append(row_flops(n_params, config, sample_lengths))
        check(bool(torch.isfinite(loss.detach()).all()), f"ZeRO-{stage}: non-finite loss {loss.item()}")
    top_kernels = _profile_step(engine, rows[-1], hub) if profile else None
    if save_dir:
        engine.save_checkpoint(save_dir, tag="iter_1.pth")
        check(os.path.isdir(os.path.join(save_dir, "iter_1.pth")), f"ZeRO-{stage}: no checkpoint in {save_dir}")
    warm = 2  # first steps pay allocation and kernel selection (the suite asks for at least 3)
    seconds = sum(times[warm:])
    out = {"tokens_per_s": sum(tokens[warm:]) / seconds, "model_flops_per_s": sum(flops[warm:]) / seconds,
           "steps_timed": len(times) - warm, "backend": model.varlen_attn_backend,
           "params_matmul": n_params, "mean_row_tokens": sum(tokens) / len(tokens)}
    if on_gpu:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    if top_kernels is not None:
        out["top_kernels"] = top_kernels
    return out


def timed_step(engine, data: dict) -> tuple:
    """One DeepSpeed training step on ``data``: (its loss, its seconds, the device synchronised)."""
    cuda = torch.cuda.is_available() and getattr(engine.device, "type", str(engine.device)).startswith("cuda")
    t0 = time.perf_counter()
    loss = engine(data, mode="loss")["loss"]
    engine.backward(loss)
    engine.step()
    if cuda:
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0


def feed(row: dict, hub, device) -> dict:
    """A collated packed row for the model; its boundaries go where the varlen attention reads them."""
    data = dict(row)
    hub.update_info("cumulative_len_rank_0", data.pop("cumulative_len")[0].to(device))
    hub.update_info("max_seqlen_rank_0", data.pop("max_seqlen"))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}


def _profile_step(engine, row: dict, hub, top: int = 15) -> list[dict]:
    """One training step under the PyTorch profiler: the kernels with the most device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda" if hasattr(engine.device, "type") else "cuda" in str(engine.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        loss = engine(feed(row, hub, engine.device), mode="loss")["loss"]
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if cuda:  # kernels only: CPU-side operator rows also carry the device time of their kernels
        events = [e for e in events if getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type)] or events
    total = sum(getattr(e, attr) for e in events) or 1
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:120], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
             "calls": e.count} for e in events[:top]]


def packed_vs_padded(model_dir: str, device: str, max_length: int, steps: int = 8) -> dict:
    """Real tokens/s of forward+backward on packed varlen rows against padded SDPA batches.

    The same chat-like pairs, in the same order: packed into rows of
    2 x max_length tokens, or batched with padding to the longest sequence of
    the batch under the same token budget per batch (pairs are added while
    2 x pairs x longest <= 2 x max_length). One model serves both (with no
    boundaries published, its attention is the stock padded SDPA). bf16 on a
    GPU, fp32 on CPU; no optimizer step, so the figure is the model's own.
    Both layouts are checked to hold every pair's tokens, and every loss to be finite.
    """
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    on_gpu = device == "cuda"
    budget = 2 * max_length
    feats = synthetic_pairs(chat_like_lengths(40 * steps, max_length, seed=4), config.vocab_size,
                            config.reward_token_id)
    packed = PackedDatasetWrapper(feats, max_packed_length=budget, shuffle_before_pack=False)
    rows = [preference_collate_fn([packed[i]], use_varlen_attn=True)["data"] for i in range(len(packed))]
    batches, cur, longest = [], [], 0
    for f in feats:
        n = max(len(f["chosen_ids"]), len(f["rejected_ids"]))
        if cur and 2 * (len(cur) + 1) * max(longest, n) > budget:
            batches.append(preference_collate_fn(cur, use_varlen_attn=False)["data"])
            cur, longest = [], 0
        cur.append(f)
        longest = max(longest, n)
    if cur:
        batches.append(preference_collate_fn(cur, use_varlen_attn=False)["data"])
    tokens = pair_tokens(feats)
    in_rows = sum(int(r["input_ids"].numel()) for r in rows)
    in_batches = sum(int(b["attention_mask"].sum()) for b in batches)
    check(in_rows == tokens and in_batches == tokens,
          f"packed vs padded: {in_rows} tokens in the rows and {in_batches} in the batches of the pairs' {tokens}")
    model = reward_model(model_dir, True, use_activation_checkpointing=True,
                         varlen_attn_backend=None if on_gpu else "sdpa")
    model = model.to(device=device, dtype=torch.bfloat16 if bf16_supported(device) else torch.float32)
    hub = MessageHub.get_instance("varlen_attn_args")

    def run(kind, items):
        model.zero_grad(set_to_none=True)
        for i, item in enumerate(items + items[:1]):  # the first one again, as a warm-up, not timed
            if kind == "packed":
                data = feed(item, hub, device)
            else:
                hub.update_info("cumulative_len_rank_0", None)
                data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in item.items()}
            if i == 1:
                if on_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            loss = model(data, mode="loss")["loss"]
            loss.backward()
            check(bool(torch.isfinite(loss.detach()).all()), f"packed vs padded ({kind}): loss {loss.item()}")
        if on_gpu:
            torch.cuda.synchronize()
        hub.update_info("cumulative_len_rank_0", None)
        return time.perf_counter() - t0

    # warm-up is item 0; items 1.. and item 0 again are timed: every pair once
    t_packed = run("packed", rows)
    t_padded = run("padded", batches)
    padded_slots = sum(int(b["input_ids"].numel()) for b in batches)
    return {"pairs": len(feats), "real_tokens": tokens, "packed_rows": len(rows), "padded_batches": len(batches),
            "padded_real_fraction": tokens / padded_slots,
            "packed_tokens_per_s": tokens / t_packed, "padded_tokens_per_s": tokens / t_padded,
            "speedup_packed_vs_padded": t_padded / t_packed, "backend": model.varlen_attn_backend}


def eval_throughput(model_dir: str, device: str, pairs: int, max_length: int) -> dict:
    """Pairs/s of tools/eval_pref.py's scorer on chat-like random pairs (length-sorted batches)."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    feats = synthetic_pairs(chat_like_lengths(pairs, max_length, seed=3), config.vocab_size,
                            config.reward_token_id)
    ids = [f[k] for f in feats for k in ("chosen_ids", "rejected_ids")]
    model, _ = load_model(model_dir, device=device, dtype=eval_dtype(device))
    score_ids(model, ids[:32], pad_id=0)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    scores = score_ids(model, ids, pad_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    check_scores(list(scores), len(ids), "scoring")
    return {"eval_pairs_per_s": pairs / seconds, "eval_tokens_per_s": sum(map(len, ids)) / seconds}
