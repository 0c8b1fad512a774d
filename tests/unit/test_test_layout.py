"""The test suite's own layout: files named for what they test, tiers by folder, and the demo files xdist relies on."""
import ast
import glob
import os
import re

import pytest

from common import REPO
from conftest import DEMO_FILES, FLEET_FILES, work_unit


@pytest.mark.parametrize("fixture, files", [("demo_run", DEMO_FILES), ("scoring_fleet", FLEET_FILES)])
def test_only_the_shared_units_files_use_their_session_fixture(fixture, files):
    """A test elsewhere using ``demo_run`` (or ``scoring_fleet``) would build it a second time on the other worker."""
    users = set()
    for path in glob.glob(os.path.join(REPO, "tests", "**", "test_*.py"), recursive=True):
        if os.path.samefile(path, __file__):
            continue
        with open(path, encoding="utf-8") as f:
            if fixture in f.read():
                users.add(os.path.relpath(path, REPO))
    assert users == set(files)


def test_work_units_are_files_with_each_shared_fixtures_files_as_one():
    assert work_unit("tests/unit/core/test_encoding.py::test_x[512-128]") == "tests/unit/core/test_encoding.py"
    assert work_unit("tests/integration/test_integration.py::test_y[zero1]") == "tests/integration/test_integration.py"
    assert {work_unit(f"{path}::test_z") for path in DEMO_FILES} == {"demo_run"}
    assert {work_unit(f"{path}::test_z") for path in FLEET_FILES} == {"scoring_fleet"}
    # the remote section measures on replicas no fault test has touched: collected (so run) first
    assert sorted(FLEET_FILES) == list(FLEET_FILES) and FLEET_FILES[-1].endswith("serve/test_fleet.py")


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


TESTS = os.path.join(REPO, "tests")
# Subjects that are not a module of the package: each file says what it checks.
UNIT_TOP = {"test_configs.py", "test_config_drift.py", "test_configs_exact.py", "test_docs.py", "test_layers.py",
            "test_test_layout.py"}
# Tests across tools and processes (a pipeline, a fault class, a round trip), not of one module.
SYSTEM = {"test_configs_train.py", "test_distributed.py", "test_faults.py", "test_interrupts.py",
          "test_output_paths.py", "test_pipeline.py", "test_round_trips.py"}


def _subject(folder: str, name: str) -> str | None:
    """The module or tool a test file in ``folder`` named ``test_<name>.py`` tests, if it exists."""
    candidates = [os.path.join("polar_xtuner", folder, f"{name}.py"), os.path.join("tools", f"{name}.py"),
                  os.path.join("tools", f"{name}.sh")]
    if folder == "core":
        candidates = [os.path.join("polar_xtuner", f"{name}.py")]
    elif folder == "bench":
        candidates = [os.path.join("bench", f"{name}.py")]
    elif folder == name:
        candidates.append(os.path.join("polar_xtuner", folder, "__init__.py"))
    return next((c for c in candidates if os.path.isfile(os.path.join(REPO, c))), None)


def _marks(path) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                ast.unparse(node.value) == "pytest.mark":
            found.add(node.attr)
    return found


def _module_marks(path) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            return set(re.findall(r"pytest\.mark\.(\w+)", ast.unparse(node.value)))
    return set()


def test_each_test_file_is_named_for_what_it_tests_in_its_wings_folder():
    wrong = []
    for tier in ("unit", "integration"):
        for path in sorted(glob.glob(os.path.join(TESTS, tier, "**", "test_*.py"), recursive=True)):
            rel = os.path.relpath(path, os.path.join(TESTS, tier))
            folder, name = os.path.dirname(rel), os.path.basename(rel)[len("test_"):-3]
            if not folder:
                if os.path.basename(rel) not in (UNIT_TOP if tier == "unit" else SYSTEM):
                    wrong.append(f"{tier}/{rel}: not named for a module, nor a listed {tier} subject")
            elif _subject(folder, name) is None:
                wrong.append(f"{tier}/{rel}: no module polar_xtuner/{folder}/{name}.py (or bench/, tools/) to test")
    assert not wrong, "\n".join(wrong)


def test_a_test_files_tier_is_its_folder():
    """unit/: no integration, slow or serving test (make test-fast runs it all); integration/ and e2e/: marked whole."""
    wrong = []
    for path in glob.glob(os.path.join(TESTS, "unit", "**", "test_*.py"), recursive=True):
        bad = _marks(path) & {"integration", "slow", "serving"}
        if bad:
            wrong.append(f"{os.path.relpath(path, TESTS)} is in unit/ but marks {sorted(bad)}")
    for tier in ("integration", "e2e"):
        for path in glob.glob(os.path.join(TESTS, tier, "**", "test_*.py"), recursive=True):
            if "integration" not in _module_marks(path):
                wrong.append(f"{os.path.relpath(path, TESTS)} is in {tier}/ without pytestmark = pytest.mark.integration")
    assert not wrong, "\n".join(wrong)
