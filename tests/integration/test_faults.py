"""Fault injection: every tool either finishes or fails with one line, and nothing is lost.

Each case asserts the exit code, the one ``error:`` line (no traceback), and
that the inputs and any earlier outputs are as they were. The classes are
listed in docs/reliability.md.
"""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from common import (REPO, TINY_CONFIG, VAL, copy_config, load_tool, one_error_line, run_in_process, run_tool,
                    run_tool_here, snapshot)
from fakes import FakeServer, reply

pytestmark = pytest.mark.integration

RECORD = {"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b"}


def write_records(path, n, seed=0, pad=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(str(rng.random()) for _ in range(pad))
            f.write(json.dumps(dict(RECORD, chosen=f"a{i} {words}", rejected=f"b{i}")) + "\n")


# -- overlapping paths ---------------------------------------------------------------------------------


def test_build_refuses_outputs_over_inputs_and_foreign_files(tmp_path):
    out = tmp_path / "out"
    assert run_tool("python", "tools/build_dataset.py", VAL, "-o", str(out)).returncode == 0
    write_records(tmp_path / "in.jsonl", 3)
    before = snapshot(out)
    for args, words in [
        ((str(out / "train.jsonl"), "-o", str(out)), "would overwrite an input"),  # its own output as input
        ((str(out), "-o", str(out)), "would overwrite an input"),  # the output directory is an input
        ((VAL, "-o", os.path.dirname(VAL)), "would overwrite an input"),
        ((str(tmp_path), "-o", str(tmp_path / "sub")), "inside the input directory"),
    ]:
        proc = run_tool("python", "tools/build_dataset.py", *args)
        assert proc.returncode == 2 and words in one_error_line(proc.stderr), (args, proc.stderr)
    assert snapshot(out) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run_tool("python", "tools/build_dataset.py", VAL, "-o", str(foreign))
    assert proc.returncode == 2 and "did not write" in one_error_line(proc.stderr)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_eval_and_rft_data_refuse_outputs_over_inputs(tmp_path, tiny_dir, capsys):
    """The tools' main() here: their refusals are the subject, not their processes (a refusal's
    exit 2 through a process: test_read_only_destinations_are_refused_before_any_work)."""
    eval_pref = load_tool("eval_pref").main
    data = tmp_path / "val.jsonl"
    data.write_bytes(open(VAL, "rb").read())
    model_before = snapshot(tiny_dir)
    cases = [
        ("--out", str(data)),
        ("--save-scores", os.path.join(tiny_dir, "config.json")),
        ("--plot", str(tmp_path)),
    ]
    for flag, path in cases:
        proc = run_in_process(eval_pref, ["--model", tiny_dir, "--data", str(data), flag, path], capsys)
        assert proc.returncode == 2, (flag, proc.stderr)
        one_error_line(proc.stderr)
    both = run_in_process(eval_pref, ["--model", tiny_dir, "--data", str(data), "--out", str(tmp_path / "r.json"),
                                      "--save-scores", str(tmp_path / "r.json")], capsys)
    assert both.returncode == 2 and "each other" in one_error_line(both.stderr)
    assert data.read_bytes() == open(VAL, "rb").read() and snapshot(tiny_dir) == model_before
    proc = run_tool_here(capsys, "make_rft_data", data, "-o", data)
    assert proc.returncode == 2 and "would overwrite an input" in one_error_line(proc.stderr)
    assert data.read_bytes() == open(VAL, "rb").read()


def test_convert_refuses_outputs_over_inputs(pth_run):
    for out in (pth_run["work"], os.path.dirname(pth_run["cfg"]), pth_run["ckpt"]):
        before = snapshot(pth_run["root"])
        proc = run_tool("bash", "tools/convert.sh", pth_run["cfg"], pth_run["ckpt"], out, "--force")
        assert proc.returncode == 2, proc.stderr
        assert "overwrite an input" in one_error_line(proc.stderr) or "is a file" in proc.stderr
        assert snapshot(pth_run["root"]) == before


# -- killed mid-run: the output is the old one or the new complete one ------------------------------------


def _kill_after(cmd, delay, env=None):
    full_env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **(env or {}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _build_complete(out):
    report = json.loads((out / "report.json").read_text())
    lines = sum(1 for _ in open(out / "train.jsonl", encoding="utf-8"))
    return report["train"] == lines and (out / "rejected.jsonl").exists()


def test_build_killed_at_random_points_leaves_old_or_new_outputs(tmp_path):
    src = tmp_path / "in.jsonl"
    write_records(src, 20000, pad=8)
    out = tmp_path / "out"
    small = tmp_path / "small.jsonl"
    write_records(small, 5, seed=1)
    assert run_tool("python", "tools/build_dataset.py", str(small), "-o", str(out)).returncode == 0
    old = snapshot(out)
    t0 = time.perf_counter()
    assert run_tool("python", "tools/build_dataset.py", str(src), "-o", str(tmp_path / "ref")).returncode == 0
    full = time.perf_counter() - t0
    new = snapshot(tmp_path / "ref")
    rng = random.Random(0)
    outcomes = set()
    for _ in range(6):
        rc = _kill_after([sys.executable, "tools/build_dataset.py", str(src), "-o", str(out)],
                         rng.uniform(0.2, full * 1.1))
        now = snapshot(out)
        assert now in (old, new), sorted(now)
        assert _build_complete(out)
        outcomes.add("new" if now == new else "old")
        if now == new:  # start again from the old output
            assert run_tool("python", "tools/build_dataset.py", str(small), "-o", str(out)).returncode == 0
        assert rc in (0, -signal.SIGKILL)
    assert "old" in outcomes  # the kills did land mid-run
    # the temporary directories the killed runs left are cleared by the next run
    assert run_tool("python", "tools/build_dataset.py", str(small), "-o", str(out)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_convert_killed_at_random_points_leaves_old_or_new_model(pth_run, tmp_path):
    out = tmp_path / "hf"
    old_marker = out / "model-00001-of-00002.safetensors"  # an earlier sharded model's: --force replaces it
    out.mkdir()
    old_marker.write_text("the previous model")
    old = snapshot(out)
    cmd = ["bash", "tools/convert.sh", pth_run["cfg"], pth_run["ckpt"], str(out), "--force"]
    t0 = time.perf_counter()
    ref = tmp_path / "ref"
    assert run_tool(*cmd[:4], str(ref)).returncode == 0
    full = time.perf_counter() - t0
    new_files = set(snapshot(ref))
    rng = random.Random(1)
    for _ in range(4):
        _kill_after(cmd, rng.uniform(1.0, full))
        now = snapshot(out)
        assert now == old or set(now) == new_files, sorted(now)
        if now != old:
            break
    proc = run_tool(*cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(snapshot(out)) == new_files  # --force: none of the old files survive
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")]
    assert leftovers == []


# -- full disk and read-only destinations ------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (root and mount allowed), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no permission); the injected ENOSPC test covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_fails_with_one_line_and_keeps_the_previous_output(small_fs, tmp_path, pth_run):
    src = tmp_path / "big.jsonl"
    write_records(src, 4000, pad=4)
    small = tmp_path / "small.jsonl"
    write_records(small, 5)
    out = small_fs / "out"
    assert run_tool("python", "tools/build_dataset.py", str(small), "-o", str(out)).returncode == 0
    before = snapshot(out)
    proc = run_tool("python", "tools/build_dataset.py", str(src), "-o", str(out))
    assert proc.returncode == 2 and "no space left" in one_error_line(proc.stderr)
    assert snapshot(out) == before and sorted(os.listdir(small_fs)) == ["out"]
    proc = run_tool("bash", "tools/convert.sh", pth_run["cfg"], pth_run["ckpt"], str(small_fs / "hf"))
    assert proc.returncode == 2 and "no space left" in one_error_line(proc.stderr)
    assert sorted(os.listdir(small_fs)) == ["out"]


def test_venv_installs_are_refused_before_they_start_on_a_small_disk(small_fs):
    """A CI run once failed after a minute of pip, ENOSPC mid-install: now each venv is sized first."""
    for target, var in (("setup", "VENV"), ("serve-setup", "SERVE_VENV"), ("rl-setup", "RL_VENV")):
        venv = small_fs / var.lower()
        proc = subprocess.run(["make", "-s", "-C", REPO, target, f"{var}={venv}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = one_error_line(proc.stderr)
        assert f" {venv}: it needs about" in line and f"GiB is free on {small_fs}" in line, line
    assert os.listdir(small_fs) == []
    # What an unfinished install already holds counts: pip keeps it on the next run.
    need = ["bash", os.path.join(REPO, "scripts", "need_space.sh"), str(small_fs / "venv"), "0.0002", "a venv"]
    (small_fs / "part").write_bytes(b"x" * 100 * 1024)  # 156 of 256 KiB left: too little for ~210
    proc = subprocess.run(need, capture_output=True, text=True)
    assert proc.returncode == 2 and "a venv" in one_error_line(proc.stderr)
    (small_fs / "venv").mkdir()
    os.rename(small_fs / "part", small_fs / "venv" / "part")  # the same 100 KiB, now the venv's
    proc = subprocess.run(need, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_injected_full_disk_in_process(tmp_path, monkeypatch, capsys):
    """Where no tmpfs can be mounted: ENOSPC raised while the output is committed."""
    import errno

    from polar_xtuner import outputs

    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import build_dataset
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    assert build_dataset.main([VAL, "-o", str(out)]) == 0
    before = snapshot(out)

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(outputs, "_fsync", full)
    capsys.readouterr()
    assert build_dataset.main([VAL, "-o", str(out), "--val-ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no space left" in err and err.count("\n") == 1
    assert snapshot(out) == before


def test_read_only_destinations_are_refused_before_any_work(tmp_path, tiny_dir, pth_run):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        ro.chmod(0o500)
        if os.access(ro, os.W_OK):
            pytest.skip("neither a read-only mount nor permissions can make a read-only directory here")
    try:
        proc = run_tool("python", "tools/build_dataset.py", VAL, "-o", str(ro / "out"))
        assert proc.returncode == 2 and "not writable" in one_error_line(proc.stderr)
        proc = run_tool("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", VAL,
                        "--out", str(ro / "r.json"))
        assert proc.returncode == 2 and "not writable" in one_error_line(proc.stderr) and "Scoring" not in proc.stderr
        proc = run_tool("bash", "tools/convert.sh", pth_run["cfg"], pth_run["ckpt"], str(ro / "hf"))
        assert proc.returncode == 2 and "not writable" in one_error_line(proc.stderr)
        assert "Loading" not in proc.stdout  # refused before the checkpoint was read
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        ro.chmod(0o700)


# -- scores that are not numbers, and servers that stall ---------------------------------------------------


@pytest.mark.parametrize("value", [pytest.param("NaN", marks=pytest.mark.integration),  # the tool's process
                                   "Infinity", "-Infinity", "true", '"1.5"', "null"])
def test_a_score_that_is_not_a_finite_number_is_an_error_naming_the_record(value, tmp_path, tiny_dir, capsys):
    """The tool's own process for NaN; the other values through its main() here: the same code, 3 s less each."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(RECORD) + "\n")
    server = FakeServer(answer=reply(200, f'[{{"embedding": [{value}]}}, {{"embedding": [0.5]}}]'.encode()))
    out = tmp_path / "report.json"
    args = ["--model", tiny_dir, "--data", str(data), "--server-type", "sglang", "--server-address", server.address,
            "--out", str(out), "--max-retries", "1", "--concurrency", "1"]
    try:  # one request for the record's two texts (the server answers two scores, whatever it is asked)
        if value == "NaN":
            proc = run_tool("python", "tools/eval_pref.py", *args)
        else:
            proc = run_tool_here(capsys, "eval_pref", *args)
    finally:
        server.close()
    line = one_error_line(proc.stderr)
    assert proc.returncode == 3 and f"{data}:1" in line and "chosen" in line, proc.stderr
    assert not out.exists()


# A whole-request deadline against a trickling server, through the tool's own process: in
# tests/integration/scoring/test_client.py (issue 27's example, and every fault kind per client).


# -- data reading ------------------------------------------------------------------------------------------


def test_bom_gzip_parquet_and_duplicate_keys(tmp_path):
    lines = [json.dumps(dict(RECORD, chosen=f"a{i}")) for i in range(3)]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "named_plain.jsonl", "wt", encoding="utf-8") as f:  # gzip under a plain name
        f.write("\n".join(lines) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([json.loads(x) for x in lines]), tmp_path / "p.parquet")
    (tmp_path / "dup.jsonl").write_text('{"prompt": "q", "reference": "r", "chosen": "a", "rejected": "b", '
                                        '"chosen": "c"}\n')
    for name in ("bom.jsonl", "z.jsonl.gz", "named_plain.jsonl", "p.parquet"):
        out = tmp_path / f"o_{name}"
        proc = run_tool("python", "tools/build_dataset.py", str(tmp_path / name), "-o", str(out))
        assert proc.returncode == 0 and "kept 3 record" in proc.stdout, (name, proc.stderr)
    proc = run_tool("python", "tools/build_dataset.py", str(tmp_path / "dup.jsonl"), "-o", str(tmp_path / "o_dup"))
    assert proc.returncode == 2
    rejected = [json.loads(x) for x in open(tmp_path / "o_dup" / "rejected.jsonl")] if (
        tmp_path / "o_dup").exists() else []
    assert "duplicate_key" in proc.stdout or any(r["field"] == "chosen" for r in rejected), proc.stdout
    # a truncated .gz: the file is named, no traceback
    blob = gzip.compress(("\n".join(lines * 200) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    proc = run_tool("python", "tools/build_dataset.py", str(tmp_path / "cut.jsonl.gz"), "-o", str(tmp_path / "o_cut"))
    assert proc.returncode == 2 and "cut.jsonl.gz" in one_error_line(proc.stderr) and "truncated" in proc.stderr
    assert not (tmp_path / "o_cut").exists()


# -- remote code ---------------------------------------------------------------------------------------------


def test_planted_model_code_runs_only_with_the_flag(tmp_path, tiny_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    marker = tmp_path / "planted_ran"
    code = (model / "modeling_internlm2.py").read_text()
    (model / "modeling_internlm2.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n" + code)
    proc = run_tool("python", "tools/eval_pref.py", "--model", str(model), "--data", VAL)
    assert proc.returncode == 2 and "--trust-remote-code" in one_error_line(proc.stderr)
    assert "modeling_internlm2.py" in proc.stderr and not marker.exists()
    proc = run_tool("python", "tools/eval_pref.py", "--model", str(model), "--data", VAL, "--trust-remote-code")
    assert proc.returncode == 0 and marker.exists(), proc.stderr[-2000:]
    # the shipped code, unchanged, needs no flag (main() here: no planted code runs in this process)
    proc = run_tool_here(capsys, "eval_pref", "--model", tiny_dir, "--data", VAL)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _model_naming_code_elsewhere(tmp_path, tiny_dir, where):
    """A copy of the tiny model whose config.json or tokenizer_config.json auto_map names another directory's module."""
    import json
    import shutil

    evil = tmp_path / "elsewhere"
    evil.mkdir()
    marker = tmp_path / "elsewhere_ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    if where == "planted":  # the directory's own modeling code, edited: not the code this project ships
        code = (model / "modeling_internlm2.py").read_text()
        (model / "modeling_internlm2.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n" + code)
        return model, marker
    name, auto_class = {"config": ("config.json", "AutoModel"),
                        "tokenizer": ("tokenizer_config.json", "AutoTokenizer")}[where]
    cfg = json.loads((model / name).read_text())
    ref = f"{evil}--evil.Evil"
    cfg.setdefault("auto_map", {})[auto_class] = [ref, None] if auto_class == "AutoTokenizer" else ref
    (model / name).write_text(json.dumps(cfg))
    return model, marker


ENTRY_POINTS = ["eval_pref", "build_dataset --tokenizer", "convert", "serve", "rl", "eval hook", "training model"]


@pytest.mark.parametrize("where", ["config", "tokenizer", "planted"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_code_an_auto_map_names_outside_the_directory_never_runs_without_consent(entry, where, tmp_path, tiny_dir,
                                                                                monkeypatch, capsys):
    """Every entry point that loads a model or tokenizer: refused in one line naming the file and the entry.

    Three ways a directory runs code we did not ship: an auto_map entry in config.json or in
    tokenizer_config.json naming another directory's module, and its own modeling file edited.
    """
    from common import load_tool

    from polar_xtuner.errors import UserError

    model, marker = _model_naming_code_elsewhere(tmp_path, tiny_dir, where)
    monkeypatch.delenv("POLAR_TRUST_REMOTE_CODE", raising=False)
    monkeypatch.chdir(tmp_path)
    file = {"config": "config.json", "tokenizer": "tokenizer_config.json", "planted": "modeling_internlm2.py"}[where]
    named = "modeling_internlm2.py" if where == "planted" else "elsewhere--evil.Evil"
    if entry == "eval_pref":
        code, err = load_tool("eval_pref").main(["--model", str(model), "--data", VAL]), capsys.readouterr().err
    elif entry == "build_dataset --tokenizer":
        code = load_tool("build_dataset").main([VAL, "-o", "out", "--tokenizer", str(model)])
        err = capsys.readouterr().err
    elif entry == "convert":
        from polar_xtuner.convert.export import main

        cfg = copy_config(str(tmp_path), "polar_consent.py", str(model), VAL)
        ckpt = tmp_path / "ckpt.pth"
        ckpt.write_bytes(b"")  # never read: the model directory is refused first
        code, err = main([cfg, str(ckpt), "out"]), capsys.readouterr().err
    elif entry == "serve":
        from polar_xtuner.serve.launcher import main

        code, err = main([str(model)]), capsys.readouterr().err
    elif entry == "rl":
        from polar_xtuner.rl.reward import PolarReward, RFTConfigError, RFTSettings

        with pytest.raises(RFTConfigError) as e:
            PolarReward(RFTSettings(model=str(model), server_address="127.0.0.1:1"))
        code, err = 2, f"error: {e.value}"
    else:
        from polar_xtuner.train.eval_hook import PolarEvalHook

        tok = dict(type=__import__("transformers").AutoTokenizer.from_pretrained,
                   pretrained_model_name_or_path=str(model), trust_remote_code=True)
        try:
            if entry == "eval hook":
                PolarEvalHook(VAL, tok).before_train(None)
            else:
                from common import build_reward_model

                build_reward_model(str(model))
            code, err = 0, capsys.readouterr().err
        except UserError as e:
            code, err = 2, f"error: {e}"
        except SystemExit as e:  # the model refuses inside the training loop: one line, exit 2
            code, err = e.code, capsys.readouterr().err
    assert not marker.exists()
    assert code == 2 and named in err and file in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err


# -- truncated checkpoints ---------------------------------------------------------------------------------


# A truncated DeepSpeed checkpoint file (model or optimizer states) through tools/convert.sh:
# tests/integration/train/test_checkpoint.py, which also checks that the error names the file.


# -- incomplete or damaged model directories -------------------------------------------------------------


@pytest.mark.parametrize("damage", ["no_tokenizer", "tokenizer_cut_at_4096", "weights_cut", "no_weights"])
def test_damaged_model_dir_is_one_line_naming_it(damage, tmp_path, tiny_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    if damage == "no_tokenizer":
        for p in model.glob("tokenizer*"):
            p.unlink()
    elif damage == "tokenizer_cut_at_4096":
        (model / "tokenizer.json").write_bytes((model / "tokenizer.json").read_bytes()[:4096])
    elif damage == "weights_cut":
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        (model / "model.safetensors").unlink()
    # main() here: the damaged directory's error is the subject (a process each: ~3 s of start-up)
    proc = run_tool_here(capsys, "eval_pref", "--model", model, "--data", VAL)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and str(model) in line, proc.stderr[-2000:]


def test_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    from polar_xtuner.outputs import atomic_dir, write_json

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".r.tmp-{dead_pid}-0000abcd.json").write_text("half")
    (tmp_path / f".r.tmp-{os.getpid()}-1111abcd.json").write_text("mine, in flight")
    (tmp_path / f".out.tmp-{dead_pid}-2222abcd").mkdir()
    write_json(str(tmp_path / "r.json"), {"ok": True})
    with atomic_dir(str(tmp_path / "out")) as work:
        open(os.path.join(work, "f"), "w").write("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["r.json", "out", f".r.tmp-{os.getpid()}-1111abcd.json"])
    with pytest.raises(ValueError):
        write_json(str(tmp_path / "bad.json"), {"x": float("nan")})  # strict JSON, and nothing written
    assert not (tmp_path / "bad.json").exists()


def test_a_tool_run_by_an_interpreter_without_its_packages_says_so_in_one_line(tmp_path, tiny_dir):
    # An interpreter outside the project's venv, as `python tools/...` from the wrong shell gives:
    # torch cannot be imported, whether a tool imports it at start or lazily inside main.
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "out"
    cases = [
        ("python", "tools/make_tiny_model.py", str(out)),
        ("bash", "tools/convert.sh", TINY_CONFIG, str(tmp_path), str(out)),
        ("python", "tools/eval_pref.py", "--model", tiny_dir, "--data", VAL),  # torch is imported inside main
    ]
    for cmd in cases:
        proc = run_tool(*cmd, env=env)
        assert proc.returncode == 2, (cmd, proc.stderr[-2000:])
        assert "has no module 'torch'" in one_error_line(proc.stderr) and "make setup" in proc.stderr, cmd
    assert sorted(os.listdir(tmp_path)) == ["sitecustomize.py"]


def test_a_module_an_auto_map_names_in_a_subfolder_is_checked_too(tmp_path, tiny_dir, monkeypatch):
    """The digest check covered the directory's top-level *.py only: a sub/module.py named by auto_map ran."""
    import json
    import shutil

    from polar_xtuner.errors import UserError
    from polar_xtuner.hf_layout import remote_code_allowed

    monkeypatch.setenv("POLAR_XTUNER_HOME", str(tmp_path / "home"))  # no earlier trusted digests
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    assert remote_code_allowed(str(model)) is True  # the shipped code: no flag needed
    (model / "sub").mkdir()
    (model / "sub" / "mod.py").write_text("class Model: pass\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"]["AutoModel"] = "sub.mod.Model"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"sub/mod.py.*pass --trust-remote-code"):
        remote_code_allowed(str(model))
    assert remote_code_allowed(str(model), trust_remote_code=True) is True


# -- the README's commands on a machine that lacks what they need -------------------------------------------


def test_the_readmes_training_command_without_a_gpu_or_the_hub_is_one_line(tmp_path):
    """A login node (no GPU) and an offline cluster (no hub): each ends in one line saying what to do."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    shipped = os.path.join(REPO, "configs", "POLAR_7B_full_varlenattn_custom_dataset.py")
    # The JSON's path here; `--deepspeed deepspeed_zero2`, as the README writes it, is the quick start's
    # train step (the next test), refused with the same line
    ds = os.path.join(REPO, "configs", "deepspeed", "polar_zero2.json")
    proc = run_tool("xtuner", "train", shipped, "--deepspeed", ds, cwd=str(tmp_path), timeout=300)
    line = one_error_line(proc.stderr)
    assert "picks bf16 or fp16 from a CUDA GPU" in line and "polar_zero2_cpu.json" in line, proc.stderr[-2000:]
    # One process for both builds (each import of mmengine and xtuner is seconds): the tokenizer's
    # UserError, printed, then the model, which ends the process in one line with exit 2.
    code = ("import sys; from mmengine.config import Config; from xtuner.registry import BUILDER; "
            "from polar_xtuner.errors import UserError; "
            f"from polar_xtuner.data.dataset import build_tokenizer; cfg = Config.fromfile({shipped!r})\n"
            "try:\n    build_tokenizer(cfg.tokenizer)\n"
            "except UserError as e:\n    print('tokenizer:', e, file=sys.stderr)\n"
            "BUILDER.build(cfg.model)")
    proc = run_tool(sys.executable, "-c", code, env={"HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path))
    tokenizer = [x for x in proc.stderr.splitlines() if x.startswith("tokenizer:")]
    model = one_error_line(proc.stderr)  # inside the training loop: the model ends the process
    assert proc.returncode == 2 and len(tokenizer) == 1, proc.stderr[-2000:]
    for line in (tokenizer[0], model):
        assert "internlm/POLAR-7B-Base" in line and "huggingface-cli download" in line, proc.stderr[-2000:]
    # the README's first step, its --tokenizer a hub name
    proc = run_tool(sys.executable, os.path.join(REPO, "tools", "build_dataset.py"), VAL, "-o", "mine",
                    "--tokenizer", "internlm/POLAR-7B-Base", env={"HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path))
    assert proc.returncode == 2 and "huggingface-cli download internlm/POLAR-7B-Base" in one_error_line(proc.stderr)


def test_the_readmes_quick_start_from_an_empty_folder_without_gpu_or_hub(tmp_path):
    """Each step of README's GPU quick start, as written, where nothing it needs exists: one line each, exit 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "my_pairs.jsonl").write_text(open(VAL).read())
    cfg = os.path.join(REPO, "configs", "POLAR_7B_full_varlenattn_custom_dataset.py")
    steps = {
        "check the data": [sys.executable, os.path.join(REPO, "tools", "build_dataset.py"), "my_pairs.jsonl",
                           "-o", "data/mine", "--val-ratio", "0.02", "--tokenizer", "internlm/POLAR-7B-Base",
                           "--max-length", "16384", "--max-response-length", "4096"],
        "train": ["xtuner", "train", cfg, "--deepspeed", "deepspeed_zero2",
                  "--cfg-options", "train_dataloader.dataset.data_files=data/mine/train.jsonl"],
        "convert": ["bash", os.path.join(REPO, "tools", "convert.sh"), cfg,
                    "work_dirs/POLAR_7B_full_varlenattn_custom_dataset", "work_dirs/polar7b_hf"],
        "evaluate": [sys.executable, os.path.join(REPO, "tools", "eval_pref.py"), "--model", "work_dirs/polar7b_hf",
                     "--data", "data/mine/val.jsonl", "--out", "report.json"],
    }
    for step, cmd in steps.items():
        proc = run_tool(*cmd, cwd=str(tmp_path), env={"HF_HUB_OFFLINE": "1"}, timeout=300)
        line = one_error_line(proc.stderr)
        # xtuner's CLI exits 0 whatever its child did; every other step exits 2
        assert proc.returncode == (0 if step == "train" else 2), (step, proc.stderr[-1500:])
        assert len(line) > 40, (step, line)  # a line that says what is missing and what to do
        if step == "train":  # `--deepspeed deepspeed_zero2` on a machine without a GPU: its CPU twin named
            assert "picks bf16 or fp16 from a CUDA GPU" in line and "polar_zero2_cpu.json" in line, line
    assert sorted(os.listdir(tmp_path)) == ["my_pairs.jsonl"]  # nothing half-made
