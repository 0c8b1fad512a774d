"""bench/shared_prefix.py (`make bench`'s shared-prefix section): its workloads."""
import os

import pytest

from common import REPO

# Every figure of the section, on small workloads, is checked on scripts/gpu_check.sh's CPU smoke,
# which runs this same function with these sizes: tests/integration/test_gpu_check.py.


def test_workloads_have_the_documented_shapes():
    import sys

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import shared_prefix

    ranked = shared_prefix.workload("ranked5", 2)
    assert len(ranked) == 12 and len({r["prompt"] for r in ranked}) == 2  # six pairs per ranked record
    long = shared_prefix.workload("long_reference", 3)
    assert len(long) == 3 and len(long[0]["reference"][0]["content"].split()) == 800
    with pytest.raises(ValueError, match="unknown workload"):
        shared_prefix.workload("magic", 1)
