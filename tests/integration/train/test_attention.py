"""polar_xtuner/train/attention.py on two CPU ranks: xtuner's Ulysses sequence parallel around the varlen attention."""
import os
import re

import pytest

from common import ASSETS, free_port, ranks_failure, run_tool

pytestmark = pytest.mark.integration


def test_ulysses_varlen_attention_on_two_cpu_ranks(tiny_dir):
    """Each rank's half of a packed row gives its half of the whole row's hidden
    states and, summed, its gradients (see tests/assets/sp_worker.py)."""
    proc = run_tool("torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
                    os.path.join(ASSETS, "sp_worker.py"), tiny_dir, timeout=300)
    assert proc.returncode == 0, ranks_failure(proc.stderr)
    # Both ranks write to one pipe; a line of one may land inside the other's output.
    assert sorted(re.findall(r"OK (\d+) ", proc.stdout)) == ["0", "1"], proc.stdout[-2000:]
