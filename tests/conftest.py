"""Fixtures and hooks only; plain helpers and constants live in tests/common.py."""
import os
import socket

# Bit-reproducible MKL results on CPU (see MKL_CBWR in polar_xtuner/constants.py), before anything imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Under pytest-xdist (`make test` runs two workers) each worker, and every tool it
# starts, gets its share of the cores: two workers with torch's default of one
# thread per core would run four busy threads on two cores.
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

import pytest

from common import ONE_PROCESS_ENGINE, VAL, copy_config, run_tool


# The files whose tests use the session's `demo_run` (minutes to build): under
# xdist they form one work unit, so the demo is trained once per run, not once per
# worker. tests/unit/test_test_layout.py checks that no other file uses it.
DEMO_FILES = ("tests/e2e/test_demo.py", "tests/integration/serve/test_serve.py")
# The files whose tests use the session's `scoring_fleet` (two vLLM replicas behind
# vllm-router: a minute of both cores to start), one work unit for the same reason.
# Collection order runs bench/test_remote.py first, on replicas no fault was injected
# into; serve/test_fleet.py kills a replica and ends by stopping the fleet.
FLEET_FILES = ("tests/integration/bench/test_remote.py", "tests/integration/serve/test_fleet.py")
SHARED_UNITS = {**{path: "demo_run" for path in DEMO_FILES}, **{path: "scoring_fleet" for path in FLEET_FILES}}


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its file (its module fixtures are built once), or the shared fixture's."""
    path = nodeid.split("::")[0]
    return SHARED_UNITS.get(path, path)


def pytest_configure(config):
    """On the controller, before any xdist worker starts: warm yapf's grammar cache.

    mmengine imports yapf, which on first use pickles its grammar into the user's
    cache dir without a lock or an atomic rename. Two workers importing it at once
    on a fresh machine (CI) let one read the other's half-written pickle and fail
    to collect (EOFError), so the first import happens here, alone.
    """
    if not hasattr(config, "workerinput"):
        warm_yapf_grammar_cache()


def warm_yapf_grammar_cache() -> bool:
    """Import yapf's grammar once (writing its cache); False where yapf is not installed."""
    try:
        import yapf  # noqa: F401  (as mmengine does; loading its grammar writes the cache)
    except ImportError:
        return False
    return True


# optional: the GPU machine's pytest runs without xdist, where an unknown hook would be an error
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s ``-n 2 --dist loadfile``: whole files per worker, the demo's files as one unit."""
    from xdist.scheduler import LoadScopeScheduling

    class PolarScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return work_unit(nodeid)

    # The collection order (slow units first, see below) rather than xdist's by-test-count order.
    config.option.loadscopereorder = False
    return PolarScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without CUDA; on an xdist worker, put the slow work units first.

    Units holding a slow test start first, so that the longest work runs while the
    short unit tests fill in around it. Every worker sorts alike, so the
    collections xdist compares stay equal.
    """
    _skip_gpu_tests_without_cuda(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow = {work_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: work_unit(item.nodeid) not in slow)  # stable: the order within is kept


def _skip_gpu_tests_without_cuda(items):
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
    from polar_xtuner.scoring.local import load_model

    return load_model(tiny_dir, device="cpu")[0]


@pytest.fixture(scope="module")
def pth_run(tiny_dir, tmp_path_factory):
    """What a training run leaves, without training: a config copy and a work dir holding the tiny model.

    Returns ``{"cfg", "ckpt", "root", "work", "state"}``: the config in
    ``root`` (a Path); ``work`` (a Path) as xtuner leaves it, ``iter_1.pth``
    (``ckpt``) and an absolute ``last_checkpoint``; ``state``, the
    checkpoint's state dict (keys as PolarRewardModel names them, ``llm.*``).
    Tests write their outputs elsewhere, and may check that ``root`` stays as
    it was. Per module: tests that break it break one file's tests only, and
    it takes well under a second to build.
    """
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("pth_run")
    hf = load_file(os.path.join(tiny_dir, "model.safetensors"))
    state = {("llm." + k[len("model."):] if k.startswith("model.") else k): v for k, v in hf.items()}
    work = root / "work"
    work.mkdir()
    torch.save({"state_dict": state, "meta": {}}, work / "iter_1.pth")
    (work / "last_checkpoint").write_text(str(work / "iter_1.pth"))
    return {"cfg": copy_config(str(root), "polar_pth_run.py", tiny_dir, VAL), "ckpt": str(work / "iter_1.pth"),
            "root": root, "work": work, "state": state}


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


@pytest.fixture(scope="session")
def _fleet_session(tmp_path_factory):
    """``tools/serve.sh TINY --replicas 2`` once per session: (the model dir, a bench.fleet.RunningFleet).

    A fresh tiny model with its lengths recorded as tools/convert.sh records
    them. The replicas run with ``--enforce-eager``: nothing checked on them
    depends on vLLM's compiled graph, which costs each start 8-17 s on 2 cores;
    tools/serve.sh's default (compiled) is what integration/serve/test_serve.py serves.
    Each replica's engine runs its worker in one process (tests/common.py, ONE_PROCESS_ENGINE).
    """
    from bench.fleet import start_fleet
    from bench.workloads import model_dir
    from polar_xtuner.encoding import EncodingSettings
    from polar_xtuner.serve.launcher import CPU_SERVE_VENV

    if not os.path.exists(os.path.join(CPU_SERVE_VENV, ".router")):
        pytest.fail(f"vLLM's CPU build or vllm-router is missing at {CPU_SERVE_VENV}: run `make serve-setup` "
                    "(make test does)")
    root = tmp_path_factory.mktemp("fleet")
    tiny = model_dir(str(root / "tiny"))
    EncodingSettings(1024, 128).save(tiny)
    with start_fleet(tiny, 2, ("--enforce-eager",), log_path=str(root / "fleet.log"),
                     env=ONE_PROCESS_ENGINE) as running:
        yield tiny, running


@pytest.fixture
def scoring_fleet(_fleet_session):
    """The session's fleet (see ``_fleet_session``), refused once stopped: SIGTERM is the last test of its unit."""
    if _fleet_session[1].proc.poll() is not None:
        pytest.fail("the session's fleet has stopped: test_fleet.py's test_sigterm_stops_every_process_of_the_fleet "
                    "stops it, and FLEET_FILES' order runs it last")
    return _fleet_session


@pytest.fixture
def taken_port():
    """A port something listens on (as another job's rendezvous would), for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def fresh_rft(monkeypatch):
    """No POLAR_* variable from the machine, and no reward built under another test's settings."""
    from polar_xtuner import rft

    for key in list(os.environ):
        if key.startswith("POLAR_"):
            monkeypatch.delenv(key)
    rft.forget_rewards()
    yield
    rft.forget_rewards()
