"""Training throughput of each speed setting of the GPU recipes, on the same rows in one process.

The variants (:data:`VARIANTS`), each a fresh model and DeepSpeed ZeRO-2 engine
from the same weights over the same rows:

* ``baseline``: the recipes before these settings (eager modules, every layer
  recomputed, unfused AdamW);
* ``liger``: + Liger Kernel (``use_liger_kernel``);
* ``recompute``: + the fastest ``activation_checkpointing`` that fits
  (:func:`bench.activation_memory.fitting_setting`; given per run);
* ``fused_adamw``: + ``torch.optim.AdamW(fused=True)`` as DeepSpeed's client optimizer;
* ``all``: the three together;
* ``shipped``: what configs/POLAR_1_8B_full_varlenattn_custom_dataset.py sets.

Two layouts of the same records (the long-reference workload of
:mod:`bench.shared_prefix`): ``shared`` (the shipped default: shared-prefix rows)
and ``packed`` (the same pairs whole, packed). Per variant and layout:

* tokens/s of the row tokens computed, mean and spread (population standard
  deviation over the timed steps; the first two steps are warm-up);
* ``mfu``: model FLOPs (6 N per computed token, plus causal attention over what
  each token attends to: its sample, or its prefix and itself) over the peak;
* ``hfu``: hardware FLOPs, the recomputed layers' forward counted too;
* ``mfu_torchtitan``: torchtitan's count, 6 N + 12 L d T per token with T the
  row's length (attention over the whole row), so figures compare with theirs;
* peak memory (CUDA), and one profiled step's device time by category (GEMM,
  attention, element-wise, optimizer; idle is the step's wall time the kernels
  leave).

Every step's loss must be finite, and each layout must hold every pair of the
workload once (the GPU run trains all its rows; the CPU smoke, ``max_steps``
of them), else :class:`bench.report.CheckFailed`.
"""

from __future__ import annotations

import os
import statistics

import torch
from mmengine import MessageHub
from transformers import AutoConfig, AutoTokenizer

from bench import REPO
from bench.gpu_sections import ds_config, feed, matmul_params, timed_step
from bench.report import check
from bench.shared_prefix import MAX_LENGTH, layouts
from bench.workloads import reward_model, shared_prefix_records

# recompute: "full" (every layer), "fit" (the run's fitting setting) or "shipped" (the config's)
VARIANTS = {
    "baseline": dict(liger=False, recompute="full", fused=False),
    "liger": dict(liger=True, recompute="full", fused=False),
    "recompute": dict(liger=False, recompute="fit", fused=False),
    "fused_adamw": dict(liger=False, recompute="full", fused=True),
    "all": dict(liger=True, recompute="fit", fused=True),
}
SHIPPED_CONFIG = os.path.join(REPO, "configs", "POLAR_1_8B_full_varlenattn_custom_dataset.py")


def shipped_settings(path: str = SHIPPED_CONFIG) -> dict:
    """The ``shipped`` variant: the recipe's own use_liger_kernel, activation_checkpointing, fused_adamw."""
    from mmengine.config import Config

    cfg = Config.fromfile(path)
    # the config deletes its top-level activation_checkpointing (mmengine's Runner reads that name): the model has it
    return dict(liger=cfg.use_liger_kernel, recompute=cfg.model.use_activation_checkpointing, fused=cfg.fused_adamw)


WARM_UP = 2
CATEGORIES = ("gemm", "attention", "optimizer", "elementwise")


def attention_pairs(row: dict) -> tuple[float, float]:
    """(causal query-key pairs the row's attention computes, the row's length) of a collated row."""
    if "shared_prefix" in row:
        sp = row["shared_prefix"]
        g, m = sp.group_ids.tolist(), sp.member_ids.tolist()
        prefix_len, pairs, i = {}, 0.0, 0
        while i < len(g):  # runs of one (group, member): a prefix, or a candidate after its prefix
            j = i
            while j < len(g) and g[j] == g[i] and m[j] == m[i]:
                j += 1
            n = j - i
            if m[i] == 0:
                prefix_len[g[i]] = n
                pairs += n * (n + 1) / 2
            else:
                pairs += n * prefix_len.get(g[i], 0) + n * (n + 1) / 2
            i = j
        return pairs, float(len(g))
    cu = row["cumulative_len"][0]
    lengths = (cu[1:] - cu[:-1]).tolist()
    return float(sum(s * (s + 1) / 2 for s in lengths)), float(sum(lengths))


def category(name: str) -> str:
    """The profile category of a kernel or operator name."""
    low = name.lower()
    if any(k in low for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in low for k in ("flash", "fmha", "attention", "flex", "sdpa", "varlen")):
        return "attention"
    if any(k in low for k in ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "cublas", "cutlass",
                              "nvjet", "xmma", "sm90", "sm80")):
        return "gemm"
    return "elementwise"


def _profile(engine, data_fn, cuda: bool) -> dict:
    """One step under the profiler: seconds per category, and idle (wall time no kernel covers).

    The profiler's own overhead lands in idle: read idle as an upper bound.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _, wall = timed_step(engine, data_fn())
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.key_averages():
        t = getattr(e, attr, 0) or 0
        if t <= 0 or (cuda and "CUDA" not in str(getattr(e, "device_type", ""))):
            continue
        if not cuda and not e.key.startswith("aten::"):
            continue  # CPU: operators only, not the Python frames around them
        out[category(e.key)] += t / 1e6
    busy = sum(out.values())
    out["idle"] = max(0.0, wall - busy)
    return {"seconds": out, "share": {k: v / wall for k, v in out.items()}, "wall_s": wall}


def run_variant(model_dir: str, rows: list, settings: dict, recompute_fit, device: str, peak_tflops: float | None,
                n_params: int, config, warm_up: int = WARM_UP, profile: bool = True) -> dict:
    """Train ``rows`` (``warm_up`` of them first, untimed) under one variant; its figures."""
    import deepspeed

    on_gpu = device == "cuda"
    recompute = {"full": True, "fit": recompute_fit}.get(settings["recompute"], settings["recompute"])
    model = reward_model(model_dir, True, use_activation_checkpointing=recompute,
                         use_liger_kernel=bool(settings["liger"] and on_gpu),
                         varlen_attn_backend=None if on_gpu else "sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0,
                                  fused=settings["fused"] or None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config("2", device),
                                      dist_init_required=True)
    hub = MessageHub.get_instance("varlen_attn_args")
    layers = config.num_hidden_layers
    k = layers if recompute is True else (0 if recompute is False else int(recompute))
    d = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens, pairs_done, model_flops, hw_flops, titan_flops = [], [], [], [], [], []
    for i, row in enumerate(rows):
        loss, seconds = timed_step(engine, _device_row(row, hub, engine.device))
        check(bool(torch.isfinite(loss.detach()).all()), f"variant {settings}: non-finite loss at step {i}")
        if i < warm_up:
            continue
        pairs, t = attention_pairs(row)
        forward = 2 * n_params * t + 4 * layers * d * pairs
        times.append(seconds)
        tokens.append(t)
        pairs_done.append(len(row["shared_prefix"].pairs) if "shared_prefix" in row else len(row["margins"]))
        model_flops.append(3 * forward)
        hw_flops.append(3 * forward + forward * k / layers)
        titan_flops.append(t * (6 * n_params + 12 * layers * d * t))
    per_step = [n / s for n, s in zip(tokens, times)]
    total = sum(times)
    out = {"activation_checkpointing": recompute, "liger": bool(settings["liger"] and on_gpu),
           "fused_adamw": settings["fused"], "steps_timed": len(times),
           "tokens_per_s": sum(tokens) / total, "pairs_per_s": sum(pairs_done) / total,
           "tokens_per_s_mean": statistics.fmean(per_step),
           "tokens_per_s_spread": statistics.pstdev(per_step) if len(per_step) > 1 else 0.0}
    if peak_tflops:
        peak = peak_tflops * 1e12
        out.update(mfu=sum(model_flops) / total / peak, hfu=sum(hw_flops) / total / peak,
                   mfu_torchtitan=sum(titan_flops) / total / peak)
    if on_gpu:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        out["profile"] = _profile(engine, lambda dev=engine.device: _device_row(rows[-1], hub, dev), on_gpu)
    del engine, model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def _device_row(row: dict, hub, device) -> dict:
    data = feed(row, hub, device)
    if "shared_prefix" in data:
        data["shared_prefix"] = data["shared_prefix"].to(device)
    return data


def variants(model_dir: str, device: str, records: int, recompute_fit, peak_tflops: float | None,
             row_tokens: int = 2 * MAX_LENGTH, names: dict | None = None, min_steps: int = 8,
             warm_up: int = WARM_UP, max_steps: int | None = None, workload: str = "long_reference") -> dict:
    """The variants on both layouts of ``records`` records of ``workload``; ``{layout: {variant: figures}}``.

    Args:
        recompute_fit: The ``fit`` variants' ``activation_checkpointing``.
        row_tokens: Tokens per packed row (the recipes' ``max_packed_length``).
        names: ``{layout: variant names}``; by default every variant and ``shipped`` on
            the shared rows, ``baseline`` and ``shipped`` on the packed path.
        min_steps, warm_up, max_steps: Timed steps at least (else CheckFailed) and at
            most (None: every row), after ``warm_up`` untimed ones.

    Raises:
        CheckFailed: fewer rows than warm-up plus ``min_steps``, a lost pair, or a non-finite loss.
    """
    _distributed_env()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recs = shared_prefix_records(workload, records)
    packed, shared, _ = layouts(recs, tokenizer, row_tokens)
    n_params = matmul_params(config)
    table = dict(VARIANTS, shipped=shipped_settings())
    names = names or {"shared": [*VARIANTS, "shipped"], "packed": ["baseline", "shipped"]}
    out = {}
    for layout, rows in (("shared", shared), ("packed", packed)):
        if not names.get(layout):
            continue  # a layout no variant runs on
        check(len(rows) >= warm_up + min_steps, f"{layout}: {len(rows)} rows for {warm_up} warm-up and "
                                                  f"{min_steps} timed steps; give more records")
        rows = rows if max_steps is None else rows[:warm_up + max_steps]
        out[layout] = {name: run_variant(model_dir, rows, table[name], recompute_fit, device, peak_tflops,
                                         n_params, config, warm_up) for name in names[layout]}
    out["rows"] = {"workload": workload, "shared": len(shared), "packed": len(packed), "records": len(recs),
                   "max_packed_length": row_tokens}
    return out


def _distributed_env(port: str = "29561") -> None:
    """One process, its own rank 0, as DeepSpeed's initialize expects."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", port))
