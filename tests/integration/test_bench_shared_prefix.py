"""bench/shared_prefix.py (`make bench`'s shared-prefix section) end to end on small workloads."""
import math
import os

import pytest

from common import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # trains the tiny model over each workload twice


def test_every_figure_comes_back_and_the_token_ratios_are_the_layouts(tiny_dir, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import shared_prefix

    out = shared_prefix.run(tiny_dir, sizes={"demo": 40, "long_reference": 2, "ranked5": 2})
    keys = {f"shared_prefix_{kind}_{name}" for kind in ("token_ratio", "train_speedup", "train_pairs_per_s",
                                                       "eval_speedup") for name in shared_prefix.WORKLOADS}
    assert set(out) == keys
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out
    # the layouts, not timings: one copy of a 1,000-token prefix per pair; one per ranked record of six pairs
    assert 1.4 < out["shared_prefix_token_ratio_long_reference"] < 1.7
    assert out["shared_prefix_token_ratio_ranked5"] > 4
    assert out["shared_prefix_token_ratio_demo"] > 1.2


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
