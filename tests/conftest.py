"""Fixtures and hooks only; plain helpers and constants live in tests/common.py."""
import os

# Bit-reproducible MKL results on CPU (see MKL_CBWR in polar_xtuner/constants.py), before anything imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest

from common import run_tool


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where torch sees none."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); torch.cuda.is_available() is False here")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random POLAR model + tokenizer, built once per test session."""
    from polar_xtuner.demo.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_polar")))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from polar_xtuner.scoring import load_model

    return load_model(tiny_dir, device="cpu")[0]


class DemoRun(str):
    """The demo's directory (a str), with the finished process as ``.proc``."""

    proc = None


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`make demo`'s pipeline run once per session; its converted model feeds the serving tests."""
    demo_dir = DemoRun(tmp_path_factory.mktemp("demo"))
    proc = run_tool("bash", "scripts/demo.sh", env={"DEMO_DIR": str(demo_dir),
                                                    "TINY_DIR": os.path.join(demo_dir, "tiny_polar")},
                    timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    demo_dir.proc = proc
    return demo_dir
