"""Sequence parallel: the config variant, the CPU refusal, and the attention on two CPU ranks."""
import os
import re

import pytest

from common import ASSETS, REPO, free_port, ranks_failure, run_tool

SP_CONFIG = os.path.join(REPO, "configs", "POLAR_7B_full_varlenattn_sp4_custom_dataset.py")


def test_sp_config_variant():
    from mmengine.config import Config

    cfg = Config.fromfile(SP_CONFIG)
    assert cfg.sequence_parallel_size == 4
    assert cfg.max_length % 4 == 0 and cfg.max_length == 4 * 16384
    assert cfg.accumulative_counts == 2 * 4  # rows per optimizer step as without it
    assert cfg.train_dataloader.sampler.type.__name__ == "SequenceParallelSampler"
    assert cfg.model.use_varlen_attn is True


@pytest.mark.integration  # runs a repository tool in a subprocess
def test_launcher_refuses_sequence_parallel_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine may run it")
    proc = run_tool("bash", "scripts/train.sh", SP_CONFIG, env={"NPROC_PER_NODE": "4"})
    assert proc.returncode == 2
    assert "runs on GPUs only" in proc.stderr and "sequence_parallel_size = 1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_ulysses_varlen_attention_on_two_cpu_ranks(tiny_dir):
    """Each rank's half of a packed row gives its half of the whole row's hidden
    states and, summed, its gradients (see tests/assets/sp_worker.py)."""
    proc = run_tool("torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
                    os.path.join(ASSETS, "sp_worker.py"), tiny_dir, timeout=300)
    assert proc.returncode == 0, ranks_failure(proc.stderr)
    # Both ranks write to one pipe; a line of one may land inside the other's output.
    assert sorted(re.findall(r"OK (\d+) ", proc.stdout)) == ["0", "1"], proc.stdout[-2000:]
