"""scripts/gpu_check.sh: the prepared GPU run, kept from rotting by its CPU smoke run.

The GPU run happens only where a GPU is lent (bench/results/gpu.json holds its
figures); here every one of its steps runs at the tiny shape on CPU, through the
same code: the users' `xtuner train` command, the converter on ZeRO-2 and ZeRO-3
checkpoints, the ZeRO throughput runs, packed against padded, scoring and pytest.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from bench import gpu_check
from bench.gpu_steps import STEPS
from bench.workloads import SHARED_PREFIX_WORKLOADS
from common import REPO

pytestmark = pytest.mark.integration

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")


def _env():
    venv_bin = os.path.dirname(sys.executable)
    return dict(os.environ, PYTHON=sys.executable, PATH=venv_bin + os.pathsep + os.environ["PATH"])


@pytest.mark.slow  # every step at the tiny shape: about 2.5 minutes on 2 cores
def test_cpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", SCRIPT, str(out), "--cpu-smoke", "--budget", "1200"], capture_output=True,
                          text=True, cwd=REPO, env=_env(), timeout=1500)
    res = json.loads((out / "results.json").read_text())
    steps = res["steps"]
    failed = {k: v.get("error") or v.get("skipped") for k, v in steps.items() if not v.get("ok")}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:], (out / "log.txt").read_text()[-4000:])
    assert res["mode"] == "cpu-smoke" and res["all_ok"] is True
    assert list(steps) == [step.name for step in STEPS]  # every step ran, in order
    assert "sdpa" in steps["versions"]["varlen_backends"] and steps["versions"]["xtuner"] == "0.2.0"
    assert steps["exactness"]["all_within_tolerance"] and len(steps["exactness"]["cases"]) == 4  # sdpa only on CPU
    train = steps["train_xtuner"]
    assert train["iterations"] >= 3 and train["tokens_per_s"] > 0 and train["checkpoints"]
    assert train["shared_prefix"].startswith("shared prefixes: ")  # the 1.8B recipe's shared_prefix = True
    _every_shared_prefix_figure(steps["shared_prefix"])
    for stage in ("zero1", "zero2", "zero3"):
        assert steps[stage]["tokens_per_s"] > 0 and steps[stage]["backend"] == "sdpa"
    assert steps["zero2"]["top_kernels"]  # the profiled step
    for conv in ("convert_zero2", "convert_zero3"):
        assert "largest relative score difference" in steps[conv]["verification"]
        assert "model.safetensors" in steps[conv]["files"]
        assert steps[conv]["written"]["tensors"] == steps["model"]["tensors"]  # read back whole
    assert steps["packed_vs_padded"]["speedup_packed_vs_padded"] > 0
    recipe = steps["recipe_gradients"]["configs"]["POLAR_1_8B_full_varlenattn_custom_dataset.py"]
    # the 1.8B recipe as shipped: a shared-prefix row, every layer recomputed, every gradient within fp32's 1e-5
    assert recipe["ok"] and recipe["shared_row"] and recipe["attention_calls"] == [2, 2]
    assert recipe["tokens_whole"] > 1.3 * recipe["tokens_shared"] and recipe["worst_grad"][1] <= 1e-5
    variants = steps["variants"]  # the smoke's selection: the shipped settings on both layouts, the baseline shared
    for layout, names in (("shared", ["baseline", "shipped"]), ("packed", ["shipped"])):
        assert list(variants[layout]) == names
        for fig in variants[layout].values():
            assert fig["tokens_per_s"] > 0 and fig["pairs_per_s"] > 0 and fig["steps_timed"] >= 1
            assert set(fig["profile"]["share"]) == {"gemm", "attention", "optimizer", "elementwise", "idle"}
            assert fig["profile"]["seconds"]["gemm"] > 0 and fig["profile"]["seconds"]["attention"] > 0
    seven = steps["train_7b"]["shared"]["shipped"]  # the smoke's tiny model stands in for the 7B layers
    assert seven["tokens_per_s"] > 0 and seven["layers"] == "2 of 2"
    assert seven["projected_tokens_per_s_full_model_8_gpus"] == 8 * seven["projected_tokens_per_s_full_model_one_gpu"]
    shipped = variants["shared"]["shipped"]
    assert (shipped["activation_checkpointing"], shipped["fused_adamw"], shipped["liger"]) == (True, True, False)
    assert steps["scoring"]["eval_pairs_per_s"] > 0
    assert "passed" in steps["pytest_gpu"]["summary"] and "passed" in steps["pytest_unit"]["summary"]
    summary = res["summary"]  # the keys other checks read, None where a figure needs the GPU
    assert set(summary) == {"mfu_shipped_1_8b", "hfu_shipped_1_8b", "tokens_per_s_shipped_1_8b", "mfu_7b",
                            "shared_prefix_train_speedup_long_reference_1_8b", "convert_bf16_ok", "pytest_gpu_ok",
                            "device", "date"}
    assert summary["mfu_shipped_1_8b"] is None and summary["tokens_per_s_shipped_1_8b"] == shipped["tokens_per_s"]
    assert summary["convert_bf16_ok"] is True and summary["pytest_gpu_ok"] is True and summary["device"] == "cpu"
    log = (out / "log.txt").read_text()
    assert "===== train_xtuner" in log and "===== pytest_unit" in log


def _every_shared_prefix_figure(out):
    """`make bench`'s shared-prefix section (bench/shared_prefix.py) on the smoke's small workloads.

    Was tests/integration/bench/test_shared_prefix.py's own run of the same function on
    the same sizes: every figure comes back (each after its pairs and scores were
    checked), and the token ratios are the layouts'.
    """
    out = {k: v for k, v in out.items() if k.startswith("shared_prefix_")}  # less the step's ok and wall_s
    keys = {f"shared_prefix_{kind}_{name}" for kind in ("token_ratio", "train_speedup", "train_pairs_per_s",
                                                       "eval_speedup") for name in SHARED_PREFIX_WORKLOADS}
    assert set(out) == keys
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out
    # the layouts, not timings: one copy of a 1,000-token prefix per pair; one per ranked record of six pairs
    assert 1.4 < out["shared_prefix_token_ratio_long_reference"] < 1.7
    assert out["shared_prefix_token_ratio_ranked5"] > 4
    assert out["shared_prefix_token_ratio_demo"] > 1.2


def test_refusals_are_one_line_with_exit_2(tmp_path):
    import torch

    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, cwd=REPO, env=_env())
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash scripts/gpu_check.sh RESULTS_DIR")
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "r"), "--cpu-smoke", "--only", "versions,train"],
                          capture_output=True, text=True, cwd=REPO, env=_env())
    assert proc.returncode == 2 and "error: --only: unknown step(s) train" in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "r")], capture_output=True, text=True, cwd=REPO,
                              env=_env())
        assert proc.returncode == 2 and "no CUDA device here; use --cpu-smoke" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_step_that_fails_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    """The driver keeps going: a failing step's error is in results.json, later steps still run."""
    out = tmp_path / "r"
    rc = gpu_check.main([str(out), "--cpu-smoke", "--only", "model,zero1,pytest_unit", "--work",
                         str(tmp_path / "w"), "--budget", "1"])
    res = json.loads((out / "results.json").read_text())
    assert rc == 1 and res["all_ok"] is False
    assert res["steps"]["model"] == {"ok": False, "skipped": "the run's time budget was spent"}
    assert res["steps"]["zero1"]["skipped"] == "needs step model, which did not pass"
    assert set(res["steps"]) == {"model", "zero1", "pytest_unit"}


def _main_in_process(args, capsys):
    capsys.readouterr()
    try:
        code = gpu_check.main(args)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("budget", ["nan", "inf", "-1", "0", "", "ten"])
def test_the_budget_is_a_finite_positive_number(budget, tmp_path, capsys):
    code, err = _main_in_process([str(tmp_path / "r"), "--cpu-smoke", "--budget", budget], capsys)
    assert code == 2 and err.startswith("error: argument --budget:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before anything was made


def test_results_dir_refusals_are_one_line_and_lose_nothing(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    code, err = _main_in_process([str(a_file), "--cpu-smoke", "--budget", "1"], capsys)
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1 and a_file.read_text() == "mine"

    earlier = tmp_path / "res"
    earlier.mkdir()
    (earlier / "results.json").write_text('{"steps": "an H200 run"}')
    code, err = _main_in_process([str(earlier), "--cpu-smoke", "--budget", "1"], capsys)
    assert code == 2 and "--force" in err and "results.json" in err and len(err.strip().splitlines()) == 1
    assert (earlier / "results.json").read_text() == '{"steps": "an H200 run"}'

    code, err = _main_in_process(["/proc/self/polar_results", "--cpu-smoke", "--budget", "1"], capsys)
    assert code == 2 and err.startswith("error: RESULTS_DIR /proc/self/polar_results: not writable")
    assert "Traceback" not in err


def test_force_moves_the_earlier_run_aside(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "results.json").write_text('{"steps": "an H200 run"}')
    (res / "log.txt").write_text("its log")
    code, err = _main_in_process([str(res), "--cpu-smoke", "--budget", "1", "--work", str(tmp_path / "w"),
                                  "--only", "versions", "--force"], capsys)
    assert code == 1  # the run itself: its one step skipped, the budget being spent
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("res.")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in err
    assert (aside[0] / "results.json").read_text() == '{"steps": "an H200 run"}'
    assert (aside[0] / "log.txt").read_text() == "its log"
    assert json.loads((res / "results.json").read_text())["steps"]["versions"]["skipped"]


def test_a_relative_results_dir_is_taken_from_where_the_command_runs(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "rel_results", "--cpu-smoke", "--budget", "1", "--only", "versions"],
                          capture_output=True, text=True, cwd=str(tmp_path), env=_env())
    assert proc.returncode == 1, proc.stderr[-2000:]  # the step skipped: the budget was spent
    assert (tmp_path / "rel_results" / "results.json").is_file()
    assert not os.path.exists(os.path.join(REPO, "rel_results"))
