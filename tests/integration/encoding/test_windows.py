"""polar_xtuner/encoding/windows.py through the tools' own processes: peak memory is bounded by the encoding lengths, not the record."""
import json
import random

import pytest

from common import run_tool
from samples import CJK, EMOJI, WORDS

pytestmark = pytest.mark.integration


# Peak memory of the tools on the ~20 MB record below (tiny tokenizer, 2-core
# CPU, measured once with the windows switched off): build_dataset --tokenizer
# 3354 MB whole-text against 896 MB with windows (734 MB on a small record);
# eval_pref 3431 MB against 1023 MB (976-1008 MB on a small record). Whole-text
# tokenization adds ~2.6 GB; the bound allows 600 MB over the small record.
PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:]); "
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


EXTRA_MB = 600


def _peak_mb(*args) -> float:
    proc = run_tool("python", "-c", PEAK, "python", *args, timeout=600)
    rc, kb = proc.stdout.split()
    assert rc == "0", proc.stderr
    return int(kb) / 1024


@pytest.fixture(scope="module")
def record_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    rng = random.Random(0)
    words = WORDS + list(CJK) + EMOJI
    big = {f: " ".join(rng.choices(words, k=1_000_000)) for f in ("prompt", "reference", "chosen", "rejected")}
    small = {f: " ".join(rng.choices(words, k=100)) for f in big}
    paths = {}
    for name, rec in (("big", big), ("small", small)):
        paths[name] = str(tmp / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    assert sum(len(v.encode()) for v in big.values()) > 18_000_000
    return paths


@pytest.mark.parametrize("tool", ["build_dataset", "eval_pref"])
def test_peak_memory_is_bounded_by_the_lengths(tiny_dir, record_files, tmp_path, tool):
    def run(name):
        if tool == "build_dataset":
            return _peak_mb("tools/build_dataset.py", record_files[name], "-o", str(tmp_path / name),
                            "--tokenizer", tiny_dir)
        return _peak_mb("tools/eval_pref.py", "--model", tiny_dir, "--data", record_files[name],
                        "--max-length", "2048", "--max-response-length", "512")

    small, big = run("small"), run("big")
    assert big - small < EXTRA_MB, f"{tool}: {big:.0f} MB on a 20 MB record, {small:.0f} MB on a small one"
