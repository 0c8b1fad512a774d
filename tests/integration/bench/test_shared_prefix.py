"""bench/shared_prefix.py (`make bench`'s shared-prefix section): its workloads; and bench/ as a package of commands."""
import os
import subprocess
import sys

import pytest

from common import REPO

pytestmark = pytest.mark.integration

# Every figure of the section, on small workloads, is checked on scripts/gpu_check.sh's CPU smoke,
# which runs this same function with these sizes: tests/integration/test_gpu_check.py.


def test_workloads_have_the_documented_shapes():
    from bench.workloads import shared_prefix_records

    ranked = shared_prefix_records("ranked5", 2)
    assert len(ranked) == 12 and len({r["prompt"] for r in ranked}) == 2  # six pairs per ranked record
    long = shared_prefix_records("long_reference", 3)
    assert len(long) == 3 and len(long[0]["reference"][0]["content"].split()) == 800
    with pytest.raises(ValueError, match="unknown workload"):
        shared_prefix_records("magic", 1)


def test_a_layout_that_loses_a_pair_is_not_timed(tiny_dir, monkeypatch):
    """The section refuses to record a figure over fewer pairs than the workload's."""
    from transformers import AutoTokenizer

    import bench.shared_prefix as section
    from bench.report import CheckFailed
    from bench.workloads import shared_prefix_records

    records = shared_prefix_records("ranked5", 1)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    unshared, shared, report = section.layouts(records, tok, 4096)
    assert sum(len(r["margins"]) for r in unshared) == len(records) == report.pairs
    real = section.group_records
    monkeypatch.setattr(section, "group_records", lambda recs, enc, row: real(recs[:-1], enc, row))
    with pytest.raises(CheckFailed, match=r"^the shared rows hold 5 pairs of the workload's 6$"):
        section.layouts(records, tok, 4096)


def test_the_bench_commands_are_exactly_its_modules_with_a_command_line():
    import bench

    found = set()
    for name in os.listdir(os.path.join(REPO, "bench")):
        if name.endswith(".py") and 'if __name__ == "__main__"' in open(os.path.join(REPO, "bench", name),
                                                                        encoding="utf-8").read():
            found.add(f"bench.{name[:-3]}")
    assert found == set(bench.COMMANDS)


def test_python_m_on_a_bench_module_without_a_command_line_refuses_in_one_line():
    for module in ("bench.workloads", "bench.report", "bench.gpu_steps"):
        proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, (module, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and "not a command" in proc.stderr \
            and "python -m bench.cpu_suite" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bench.cpu_suite", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--convert-shape" in proc.stdout, proc.stderr[-2000:]


def test_an_import_cycle_in_bench_breaks_the_contract(tmp_path):
    """bench/ is covered by pyproject.toml's acyclic contract: a section importing its suite back fails it."""
    import shutil

    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    for name in ("polar_xtuner", "tools", "bench", "configs"):
        shutil.copytree(os.path.join(REPO, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.png"))
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
    workloads = tmp_path / "bench" / "workloads.py"
    workloads.write_text(workloads.read_text() + "\nfrom bench.cpu_suite import main  # noqa\n")
    proc = subprocess.run([lint, "--config", str(tmp_path / "pyproject.toml")], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "bench has no import cycle BROKEN" in proc.stdout and ".workloads -> .cpu_suite" in proc.stdout, \
        proc.stdout[-3000:]
