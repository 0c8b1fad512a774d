"""Peak memory of the converter (tools/convert.sh) against the size of one copy of the weights.

Usage:
    python -m bench.convert_memory [--shape 1.8b|0.5b|tiny] [--zero 1|2|3] [--workdir DIR]
        [--out bench/results/convert_memory.json]

Builds a randomly initialised model directory of the given shape (the real
POLAR-1.8B dimensions by default, about 1.9B parameters), writes a training
checkpoint (.pth, fp32, the keys PolarRewardModel saves), converts it with
``python -m polar_xtuner.convert`` (what tools/convert.sh runs, its own
verification on) to fp32 and to bf16, and reports the converter's peak RSS
divided by the fp32 size of the weights. Each written directory is read back
before its figures count: its safetensors files must hold every tensor of the
checkpoint, of its shape, in the output dtype, and exactly their bytes
(``convert_verified: true``). Needs about 3x the weights on disk.
"""

import argparse
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModel

from bench import REPO
from bench.recipe_gradients import config_copy
from bench.report import check, run_command, write_results
from bench.workloads import SHAPES, model_dir

DEMO_CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")
# The output dtypes measured: safetensors' name for each and its bytes per element.
DTYPES = {"fp32": ("F32", 4), "bf16": ("BF16", 2)}
# Runs a command and prints its peak RSS (KiB, Linux) and exit code: the converter's own
# peak, whatever the process that starts it holds.
PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def write_deepspeed_checkpoint(model_path: str, out_dir: str, stage: int) -> None:
    """One DeepSpeed ZeRO step of a random model (one CPU process), saved as iter_1.pth/.

    The module has PolarRewardModel's keys (``llm.*``, ``v_head.*``), so the
    converter reads it as it reads a training run's checkpoint.
    """
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    import deepspeed  # only the --write-deepspeed child needs it (seconds to import)

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
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


def checkpoint_tensors(model_path: str) -> dict[str, tuple[int, ...]]:
    """The HF model's tensor names and shapes (built on the meta device): what a conversion must write."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def safetensors_header(path: str) -> tuple[dict, int]:
    """(tensor entries, size of the data section) of a .safetensors file, read without loading a tensor.

    The format: an 8-byte little-endian header length, the JSON header (per
    tensor its dtype, shape and byte offsets), then the data.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        check(len(head) == 8, f"{path}: not a safetensors file ({len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, os.path.getsize(path) - 8 - n


def verify_converted(out_dir: str, expected: dict[str, tuple[int, ...]], dtype: str) -> dict:
    """Read a converted directory back: every tensor of ``expected``, its shape, ``dtype``, its bytes.

    Args:
        out_dir: The converter's output directory.
        expected: Tensor name -> shape of the checkpoint's model (:func:`checkpoint_tensors`).
        dtype: The output dtype asked for ("fp32" or "bf16").

    Returns:
        ``{"tensors": n, "bytes": b}`` of what was written.

    Raises:
        CheckFailed: one line naming what is missing, extra, misshapen or short.
    """
    name, size = DTYPES[dtype]
    files = sorted(glob.glob(os.path.join(out_dir, "*.safetensors")))
    check(bool(files), f"{out_dir}: no .safetensors file written")
    written, data_bytes = {}, 0
    for path in files:
        header, data = safetensors_header(path)
        written.update(header)
        data_bytes += data
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    check(not missing, f"{out_dir}: {len(missing)} of the checkpoint's {len(expected)} tensors missing "
                       f"({', '.join(missing[:3])})")
    check(not extra, f"{out_dir}: {len(extra)} tensors the checkpoint does not have ({', '.join(extra[:3])})")
    for key, shape in expected.items():
        got = written[key]
        check(tuple(got["shape"]) == shape,
              f"{out_dir}: {key} has shape {got['shape']}, the checkpoint's {list(shape)}")
        check(got["dtype"] == name, f"{out_dir}: {key} is {got['dtype']}, expected {name} ({dtype})")
        start, end = got["data_offsets"]
        want = torch.Size(shape).numel() * size
        check(end - start == want, f"{out_dir}: {key} holds {end - start} bytes of its {want}")
    want = sum(size * torch.Size(s).numel() for s in expected.values())
    check(data_bytes == want, f"{out_dir}: {data_bytes} bytes of tensor data written, the checkpoint's "
                              f"{len(expected)} tensors are {want} in {dtype}")
    return {"tensors": len(written), "bytes": data_bytes}


def convert_peak(config: str, checkpoint: str, out_dir: str, dtype: str) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of ``python -m polar_xtuner.convert`` writing ``out_dir``, verification on."""
    cmd = [sys.executable, "-m", "polar_xtuner.convert", config, checkpoint, out_dir, "--dtype", dtype, "--force"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    fields = out.stdout.strip().split()[-2:]
    check(len(fields) == 2, f"conversion to {dtype}: no peak measured: {last}")
    rss_kb, rc = map(int, fields)
    check(rc == 0, f"conversion to {dtype} failed (exit {rc}): {last}")
    return rss_kb * 1024, seconds


def measure(shape: str, work: str, zero: int | None = None) -> dict:
    """Convert a random ``shape`` checkpoint to fp32 and bf16 in ``work``; peak RSS figures.

    ``zero``: None for a .pth checkpoint, else a DeepSpeed ZeRO-``zero`` directory.

    Raises:
        CheckFailed: a conversion failed, or its directory does not hold the checkpoint's tensors.
    """
    path = model_dir(os.path.join(work, "model"), shape, with_weights=False)
    expected = checkpoint_tensors(path)
    # The training checkpoint: random fp32 weights under PolarRewardModel's keys.
    gen = torch.Generator().manual_seed(0)
    n_params = sum(torch.Size(s).numel() for s in expected.values())
    n_bytes = 4 * n_params
    ckpt = os.path.join(work, "iter_1.pth")
    if zero is None:
        state = {("llm." + k[6:] if k.startswith("model.") else k): torch.randn(s, generator=gen) * 0.02
                 for k, s in expected.items()}
        torch.save({"state_dict": state}, ckpt)
        del state
    else:
        proc = subprocess.run([sys.executable, "-m", "bench.convert_memory", "--write-deepspeed", path, work,
                               str(zero)], cwd=REPO, capture_output=True, text=True)
        check(proc.returncode == 0, f"the ZeRO-{zero} checkpoint was not written (exit {proc.returncode}): "
                                    f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    cfg = config_copy(DEMO_CONFIG, work, "polar_bench_convert_mem.py", pretrained_model_name_or_path=path)

    results = {"params": n_params, "weights_fp32_bytes": n_bytes}
    for dtype in DTYPES:
        out_dir = os.path.join(work, f"hf_{dtype}")
        rss, seconds = convert_peak(cfg, ckpt, out_dir, dtype)
        written = verify_converted(out_dir, expected, dtype)
        results[f"convert_{dtype}_peak_rss_bytes"] = rss
        results[f"convert_{dtype}_peak_rss_ratio"] = rss / n_bytes
        results[f"convert_{dtype}_seconds"] = seconds
        results[f"convert_{dtype}_tensors"] = written["tensors"]
        results[f"convert_{dtype}_bytes_written"] = written["bytes"]
    results["shape"] = shape
    results["checkpoint"] = "pth" if zero is None else f"deepspeed zero{zero}"
    # the headline figure: the worse of the two output dtypes
    results["convert_peak_rss_ratio"] = max(results["convert_fp32_peak_rss_ratio"],
                                            results["convert_bf16_peak_rss_ratio"])
    results["convert_verified"] = True  # both directories read back whole (verify_converted)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.8b")
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=None,
                   help="measure a DeepSpeed ZeRO checkpoint directory instead of a .pth")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary dir, removed)")
    p.add_argument("--out", default=None, help="also write the figures, with the machine and date, as JSON")
    p.add_argument("--write-deepspeed", nargs=3, metavar=("MODEL_DIR", "OUT_DIR", "STAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_deepspeed:
        path, out_dir, stage = args.write_deepspeed
        write_deepspeed_checkpoint(path, out_dir, int(stage))
        return 0
    if args.workdir:
        results = measure(args.shape, args.workdir, args.zero)
    else:
        with tempfile.TemporaryDirectory(prefix="polar_convert_mem_") as work:
            results = measure(args.shape, work, args.zero)
    if args.out:
        write_results(results, args.out)
    else:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
