"""Activation memory of one POLAR layer per token, measured, and what each checkpointing setting needs.

Usage:
    .venv/bin/python -m bench.activation_memory [--tokens 256] [--out bench/results/activation_memory.json]

One InternLM2 decoder layer at the real 1.8B and 7B sizes runs forward in
bf16 on the CPU over one sequence; every tensor autograd saves for backward
is counted once (``torch.autograd.graph.saved_tensors_hooks``, deduplicated
by storage). Attention is PyTorch's SDPA, causal: on CPU its flash kernel
saves what a GPU flash kernel saves (queries, keys, values, output, log-sum-exp),
except that InternLM2's SDPA path repeats the key/value heads first (an
overcount of 2 x (heads - kv heads) x head_dim x 2 bytes per token).

From the bytes per token per layer ``a``, the hidden size ``d`` and the layer
count ``L``, at ``T`` tokens per packed row (the configs' ``max_packed_length``):

* ``False``: ``L * a * T``;
* ``True``: ``L * 2d * T`` (each layer's bf16 input) plus ``a * T`` (the layer being recomputed);
* ``k``: ``k * 2d * T + (L - k) * a * T + a * T``.

Model states under DeepSpeed ZeRO-2 with bf16 weights and fp32 AdamW on G
GPUs: ``2N`` weights + ``2N`` gradients + ``12N / G`` (fp32 master, two moments).
The table prints the sum per GPU for 1 and 8 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoConfig, AutoModel

from bench.report import check, machine, run_command
from bench.workloads import model_dir

SHAPES = {  # the published POLAR configs' sizes
    "1.8B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544),
    "7B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=92544),
}
GiB = 2**30


def layer_bytes_per_token(shape: dict, tokens: int) -> dict:
    """Bytes autograd saves per token in one decoder layer at ``shape``, in bf16."""
    tiny = model_dir(os.path.join(os.environ.get("TMPDIR", "/tmp"), "polar_actmem_tiny"))
    cfg = AutoConfig.from_pretrained(tiny, trust_remote_code=True)
    for k, v in shape.items():
        setattr(cfg, k, v)
    cfg.num_hidden_layers, cfg.vocab_size, cfg.attn_implementation = 1, 128, "sdpa"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, trust_remote_code=True, torch_dtype=torch.bfloat16).train()
    layer = model.model.layers[0] if hasattr(model, "model") else model.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(t: int) -> int:
        x = torch.randn(1, t, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        seen: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # weights are kept anyway, not activations
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x, position_ids=torch.arange(t)[None])
        return sum(seen.values())

    # the slope between two lengths: per-token bytes without fixed ones (rotary caches, buffers)
    per_token = (saved_bytes(2 * tokens) - saved_bytes(tokens)) / tokens
    # the layer's input alone is 2d bytes a token: a count below it saved nothing of the forward
    check(per_token > 2 * cfg.hidden_size, f"{per_token:.0f} bytes saved per token, less than the layer's input")
    return {"bytes_per_token": per_token, "input_bytes_per_token": 2 * cfg.hidden_size}


def parameters(shape: dict) -> int:
    d, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * i + 2 * d
    return L * per_layer + v * d + d + d  # layers, embeddings, final norm, value head


def fitting_setting(measured: dict, name: str, gpus: int = 1, budget_gib: float = 64.0,
                    tokens_per_row: int = 32768):
    """The fastest ``activation_checkpointing`` whose activations and ZeRO-2 model states fit ``budget_gib``.

    False (nothing recomputed) if that fits, else the fewest recomputed layers k
    that fit, else True (every layer). The default budget leaves about 14% of an
    80 GB GPU (74.5 GiB) to the allocator's fragmentation, kernels' workspaces and
    the optimizer's temporaries, which the activation count does not see.
    """
    shape, m = SHAPES[name], measured[name]
    L, a, x = shape["num_hidden_layers"], m["bytes_per_token"], m["input_bytes_per_token"]
    n = parameters(shape)
    states = 4 * n + 12 * n / gpus
    if (L * a * tokens_per_row + states) / GiB <= budget_gib:
        return False
    for k in range(1, L):
        if ((k * x + (L - k) * a + a) * tokens_per_row + states) / GiB <= budget_gib:
            return k
    return True


def table(measured: dict, tokens_per_row: int = 32768) -> list[dict]:
    rows = []
    for name, m in measured.items():
        shape = SHAPES[name]
        L, a, x = shape["num_hidden_layers"], m["bytes_per_token"], m["input_bytes_per_token"]
        n = parameters(shape)
        settings = {"False": L * a, "True": L * x + a}
        for k in (L // 4, L // 2, 3 * L // 4):
            settings[str(k)] = k * x + (L - k) * a + a
        for setting, per_token in settings.items():
            act = per_token * tokens_per_row
            for gpus in (1, 8):
                states = 4 * n + 12 * n / gpus
                rows.append({"model": name, "activation_checkpointing": setting, "gpus": gpus,
                             "activations_gib": act / GiB, "model_states_gib": states / GiB,
                             "total_gib": (act + states) / GiB})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="sequence length of the measured forward")
    p.add_argument("--out", default=None, help="write the measurements and the table as JSON")
    args = p.parse_args(argv)
    measured = {name: layer_bytes_per_token(shape, args.tokens) for name, shape in SHAPES.items()}
    rows = table(measured)
    print("| model | activation_checkpointing | GPUs | activations GiB | model states GiB | total GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['activation_checkpointing']} | {r['gpus']} | {r['activations_gib']:.1f} | "
              f"{r['model_states_gib']:.1f} | {r['total_gib']:.1f} |")
    for name, m in measured.items():
        print(f"{name}: {m['bytes_per_token'] / 1024:.1f} KiB saved per token per layer (bf16), "
              f"{m['input_bytes_per_token'] / 1024:.1f} KiB of it the layer's input", file=sys.stderr)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "tokens_measured": args.tokens,
                       "tokens_per_row": 32768, "per_layer": measured,
                       "parameters": {k: parameters(s) for k, s in SHAPES.items()}, "table": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
