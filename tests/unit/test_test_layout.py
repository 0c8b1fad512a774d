"""The test suite's own layout rules, which `make test`'s two xdist workers rely on."""
import glob
import os

from common import REPO
from conftest import DEMO_FILES, work_unit


def test_only_the_demo_files_use_the_session_demo():
    """A test elsewhere using ``demo_run`` would train the demo a second time on the other worker."""
    users = set()
    for path in glob.glob(os.path.join(REPO, "tests", "**", "test_*.py"), recursive=True):
        if os.path.samefile(path, __file__):
            continue
        with open(path, encoding="utf-8") as f:
            if "demo_run" in f.read():
                users.add(os.path.relpath(path, REPO))
    assert users == set(DEMO_FILES)


def test_work_units_are_files_with_the_demo_files_as_one():
    assert work_unit("tests/unit/core/test_encoding.py::test_x[512-128]") == "tests/unit/core/test_encoding.py"
    assert work_unit("tests/integration/test_integration.py::test_y[zero1]") == "tests/integration/test_integration.py"
    assert {work_unit(f"{path}::test_z") for path in DEMO_FILES} == {"demo_run"}


def test_the_controller_writes_yapfs_grammar_cache_before_workers_start(tmp_path):
    """Two workers importing mmengine on a fresh machine raced on yapf's cache (CI: EOFError at collection)."""
    import subprocess
    import sys

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    code = "import sys; sys.path[:0] = ['tests']; import conftest; print(conftest.warm_yapf_grammar_cache())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    pickles = sorted(p.name.split("-py")[0] for p in tmp_path.glob("YAPF/*/*.pickle"))
    assert pickles == ["Grammar", "PatternGrammar"]
