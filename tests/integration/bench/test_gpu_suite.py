"""bench/gpu_suite.py and bench/gpu_sections.py: the FLOP count against PyTorch's counter, and a CPU smoke run.

The GPU section of `make bench` only runs where a GPU is lent; these tests keep
its arithmetic and its code path honest on the CPU machines CI has.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench.gpu_sections import matmul_params, peak_for_name, row_flops
from common import REPO, free_port, run_in_process

pytestmark = pytest.mark.integration


def test_flops_per_token_match_pytorchs_counter(tiny_dir):
    """One sequence, forward only: 2 N T for the matrices plus 4 L d T^2 for full attention.

    The counter sees every matrix product the model runs, so a wrong N (an
    embedding or a norm counted, the value head missed) or a wrong attention
    width shows here. Training counts 3x the forward, and causal attention
    T (T + 1) / 2 context pairs instead of T^2.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(tiny_dir, trust_remote_code=True, attn_implementation="eager")
    n, t = matmul_params(config), 64
    ids = torch.randint(5, config.vocab_size, (1, t))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    layers, width = config.num_hidden_layers, config.hidden_size
    expected = 2 * n * t + 4 * layers * width * t * t
    # what is left is the rotary embedding's small outer product per layer
    assert abs(counter.get_total_flops() - expected) / expected < 1e-3
    assert row_flops(n, config, [t]) == 6 * n * t + 12 * layers * width * t * (t + 1) / 2
    assert row_flops(n, config, [t, t]) == 2 * row_flops(n, config, [t])  # samples attend only within themselves


def test_gpu_bench_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """`make bench-gpu`'s main() here; the stage in its child process, as on the GPU."""
    from bench import gpu_suite

    out = tmp_path / "gpu.json"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    rc = gpu_suite.main(["--shape", "tiny", "--device", "cpu", "--stages", "2", "--steps", "3", "--eval-pairs", "16",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    res = json.loads(out.read_text())
    assert res["zero2_train_tokens_per_s_per_gpu"] > 0 and res["eval_pairs_per_s"] > 0
    assert res["varlen_backend"] == "sdpa" and res["max_packed_length"] == 2048
    assert "zero2_mfu" not in res  # no peak FLOP/s known for a CPU: no made-up MFU


@pytest.mark.gpu
def test_gpu_bench_runs_on_cuda(tmp_path):
    """`make bench-gpu`'s code path on a real GPU, at the tiny shape: figures, MFU and peak memory."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--shape", "tiny", "--device", "cuda",
         "--stages", "2", "--steps", "3", "--eval-pairs", "16", "--peak-tflops", "100", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, MASTER_PORT=str(free_port())), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["zero2_train_tokens_per_s_per_gpu"] > 0 and res["eval_pairs_per_s"] > 0
    assert 0 < res["zero2_mfu"] < 1 and res["zero2_peak_memory_gib"] > 0


def test_gpu_bench_refuses_bad_arguments(capsys):
    """Bad flags: exit 2 with the flag named, before any model or process is made.

    In process: the subject is main()'s checks (a process of its own costs ~7 s of imports for them).
    """
    from bench import gpu_suite

    proc = run_in_process(gpu_suite.main, ["--device", "cpu", "--stages", "4"], capsys)
    assert proc.returncode == 2 and "unknown ZeRO stage(s) 4" in proc.stderr
    proc = run_in_process(gpu_suite.main, ["--device", "cpu", "--steps", "2"], capsys)
    assert proc.returncode == 2 and "--steps 2: at least 3" in proc.stderr


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_the_peak_is_the_exact_parts(name, peak):
    """SXM, PCIe and NVL parts of one chip differ; an unknown GPU gets no made-up MFU."""
    assert peak_for_name(name) == peak
