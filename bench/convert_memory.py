"""Peak memory of tools/convert.sh against the size of one copy of the weights.

Usage:
    python bench/convert_memory.py [--shape 1.8b|0.5b|tiny] [--zero 1|2|3] [--workdir DIR]

Builds a randomly initialised model directory of the given shape (the real
POLAR-1.8B dimensions by default, about 1.9B parameters), writes a training
checkpoint (.pth, fp32, the keys PolarRewardModel saves), converts it with
verification, and reports the converter's peak RSS divided by the fp32 size of
the weights. Needs about 3x the weights on disk.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "1.8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768),
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768),
    "tiny": {},
}


def write_deepspeed_checkpoint(model_dir: str, out_dir: str, stage: int) -> None:
    """One DeepSpeed ZeRO step of a random model (one CPU process), saved as iter_1.pth/.

    The module has PolarRewardModel's keys (``llm.*``, ``v_head.*``), so the
    converter reads it as it reads a training run's checkpoint.
    """
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    import deepspeed
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    hf = AutoModel.from_config(config, trust_remote_code=True)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm, self.v_head = hf.model, hf.v_head

    model = Wrapper()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                 "bf16": {"enabled": False}, "fp16": {"enabled": False},
                 "zero_optimization": {"stage": stage, "overlap_comm": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                      config=ds_config, dist_init_required=True)
    ids = torch.randint(5, config.vocab_size, (1, 16))
    loss = engine.module.v_head(engine.module.llm(input_ids=ids)[0]).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out_dir, tag="iter_1.pth")


def measure(shape: str, work: str, zero: int | None = None) -> dict:
    """Convert a random ``shape`` checkpoint to fp32 and bf16 in ``work``; peak RSS figures.

    ``zero``: None for a .pth checkpoint, else a DeepSpeed ZeRO-``zero`` directory.
    """
    from transformers import AutoConfig, AutoModel

    from polar_xtuner.demo.tiny_model import make_tiny_model

    model_dir = make_tiny_model(os.path.join(work, "model"), with_weights=False, **SHAPES[shape])
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    # The training checkpoint: random fp32 weights under PolarRewardModel's keys.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModel.from_config(config, trust_remote_code=True).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {("llm." + k[6:] if k.startswith("model.") else k): torch.randn(s, generator=gen) * 0.02
             for k, s in shapes.items()}
    n_bytes = sum(t.numel() * 4 for t in state.values())
    ckpt = os.path.join(work, "iter_1.pth")
    if zero is None:
        torch.save({"state_dict": state}, ckpt)
    del state
    if zero is not None:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-deepspeed", model_dir, work, str(zero)],
                       check=True, cwd=REPO, capture_output=True)
    text = open(os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py"), encoding="utf-8").read()
    text, n = re.subn(r"^pretrained_model_name_or_path = .*$", f"pretrained_model_name_or_path = {model_dir!r}",
                      text, flags=re.M)
    if n != 1:
        raise RuntimeError(f"the demo config has {n} lines `pretrained_model_name_or_path = ...`, expected 1; "
                           "update bench/convert_memory.py")
    cfg = os.path.join(work, "polar_bench_convert_mem.py")
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(text)

    results = {"params": n_bytes // 4, "weights_fp32_bytes": n_bytes}
    for dtype in ("fp32", "bf16"):
        code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "polar_xtuner.convert.export", cfg, ckpt,
                              os.path.join(work, f"hf_{dtype}"), "--dtype", dtype, "--force"],
                             capture_output=True, text=True, cwd=REPO)
        rss_kb, rc = map(int, out.stdout.strip().split()[-2:])
        if rc != 0:
            raise SystemExit(f"conversion failed:\n{out.stderr[-2000:]}")
        results[f"convert_{dtype}_peak_rss_bytes"] = rss_kb * 1024
        results[f"convert_{dtype}_peak_rss_ratio"] = rss_kb * 1024 / n_bytes
        results[f"convert_{dtype}_seconds"] = time.perf_counter() - t0
    results["shape"] = shape
    results["checkpoint"] = "pth" if zero is None else f"deepspeed zero{zero}"
    # the headline figure: the worse of the two output dtypes
    results["convert_peak_rss_ratio"] = max(results["convert_fp32_peak_rss_ratio"],
                                            results["convert_bf16_peak_rss_ratio"])
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.8b")
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=None,
                   help="measure a DeepSpeed ZeRO checkpoint directory instead of a .pth")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary dir, removed)")
    p.add_argument("--write-deepspeed", nargs=3, metavar=("MODEL_DIR", "OUT_DIR", "STAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_deepspeed:
        model_dir, out_dir, stage = args.write_deepspeed
        write_deepspeed_checkpoint(model_dir, out_dir, int(stage))
        return 0
    if args.workdir:
        results = measure(args.shape, args.workdir, args.zero)
    else:
        with tempfile.TemporaryDirectory(prefix="polar_convert_mem_") as work:
            results = measure(args.shape, work, args.zero)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
