"""Output paths (issue 27, class 4): symlinks are written through, modes follow the umask, parents must exist.

Rules (polar_xtuner/outputs.py, shared by every writer):

* an output path that is a symbolic link is written through: its target is
  replaced atomically and the link is kept (it was swapped for a folder,
  then ``OSError: Cannot call rmtree on a symbolic link``, leaving a
  ``.tmp-*`` link behind);
* written files have the modes the user's umask gives (a converted
  ``model.safetensors`` was 0600, from safetensors' private temporary file);
* the folder an output goes into must exist: a missing one is one line
  naming it, exit 2, and nothing is created.
"""
import json
import os
import stat

import pytest

from common import VAL, one_error_line, run_in_process, run_tool, run_tool_here

pytestmark = pytest.mark.integration


def leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if ".tmp-" in p or ".old-" in p)


# -- symbolic links ---------------------------------------------------------------------------------------


def test_build_writes_through_a_symlinked_output(tmp_path):
    real = tmp_path / "v1"
    assert run_tool("python", "tools/build_dataset.py", VAL, "-o", str(real)).returncode == 0
    link = tmp_path / "out"
    link.symlink_to("v1")
    proc = run_tool("python", "tools/build_dataset.py", VAL, "-o", str(link), "--val-ratio", "0.25")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.islink(link) and os.readlink(link) == "v1"  # the link is kept ...
    assert (real / "val.jsonl").exists()  # ... and its target holds the new output
    assert leftovers(tmp_path) == []


def test_convert_writes_through_a_symlinked_out_dir(pth_run, tmp_path, capsys):
    from polar_xtuner.convert.export import main

    real = tmp_path / "models" / "v1"
    real.parent.mkdir()
    real.mkdir()
    (real / "model-00001-of-00002.safetensors").write_text("an earlier model")
    link = tmp_path / "hf"
    link.symlink_to(real)
    assert main([pth_run["cfg"], pth_run["ckpt"], str(link), "--force", "--no-verify"]) == 0, capsys.readouterr().err
    assert os.path.islink(link) and os.path.realpath(link) == str(real)
    assert (real / "model.safetensors").exists() and not (real / "model-00001-of-00002.safetensors").exists()
    assert leftovers(tmp_path) == [] and leftovers(real.parent) == []


def test_a_file_output_is_written_through_its_symlink(tmp_path):
    from polar_xtuner.outputs import atomic_file, write_json

    target = tmp_path / "reports" / "r.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "r.json"
    link.symlink_to(target)
    write_json(str(link), {"new": 1})
    assert os.path.islink(link) and json.loads(target.read_text()) == {"new": 1}
    dangling = tmp_path / "later.txt"
    dangling.symlink_to(tmp_path / "reports" / "later.txt")  # a link to an output not written yet
    with atomic_file(str(dangling)) as tmp, open(tmp, "w") as f:
        f.write("x")
    assert os.path.islink(dangling) and (tmp_path / "reports" / "later.txt").read_text() == "x"
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []


# -- modes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_converted_files_follow_the_umask(umask, pth_run, tmp_path, capsys):
    """022 through tools/convert.sh's process under a shell's umask; 027 through its main() under os.umask."""
    out = tmp_path / "hf"
    args = [pth_run["cfg"], pth_run["ckpt"], str(out), "--no-verify"]
    if umask == 0o022:
        proc = run_tool("bash", "-c", f'umask {umask:03o} && exec bash tools/convert.sh "$@"', "convert", *args)
    else:
        from polar_xtuner.convert.export import main as convert  # what tools/convert.sh runs

        old = os.umask(umask)
        try:
            proc = run_in_process(convert, args, capsys)
        finally:
            os.umask(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = {p: stat.S_IMODE(os.stat(out / p).st_mode) for p in os.listdir(out)}
    assert modes and all(m == 0o666 & ~umask for m in modes.values()), {p: oct(m) for p, m in modes.items()}
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask


def test_atomic_outputs_follow_the_umask_whatever_the_writer_made(tmp_path):
    from polar_xtuner.outputs import atomic_dir, atomic_file

    old = os.umask(0o022)
    try:
        with atomic_dir(str(tmp_path / "d")) as work:
            os.mkdir(os.path.join(work, "sub"), 0o700)
            fd = os.open(os.path.join(work, "sub", "w.bin"), os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp does
            os.close(fd)
        with atomic_file(str(tmp_path / "f.txt")) as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "sub").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "sub" / "w.bin").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == 0o644


# -- the folder of an output must exist ---------------------------------------------------------------------


def test_a_missing_output_folder_is_one_line_naming_it_in_every_writer(tmp_path, tiny_dir, pth_run, capsys):
    """Each tool's process once; eval_pref's other two outputs through its main() here (the same check)."""
    missing = tmp_path / "no" / "such"
    src = tmp_path / "in.jsonl"
    src.write_text(open(VAL, encoding="utf-8").read())
    evaluate = ["--model", tiny_dir, "--data", str(src)]
    cases = [
        ("python", "tools/build_dataset.py", str(src), "-o", str(missing / "out")),
        ("bash", "tools/convert.sh", pth_run["cfg"], pth_run["ckpt"], str(missing / "hf")),
        ("python", "tools/eval_pref.py", *evaluate, "--out", str(missing / "r.json")),
        ("eval_pref", *evaluate, "--save-scores", str(missing / "s.jsonl")),
        ("eval_pref", *evaluate, "--plot", str(missing / "p.png")),
        ("python", "tools/make_rft_data.py", str(src), "-o", str(missing / "rl.jsonl")),
    ]
    for cmd in cases:
        if cmd[0] == "eval_pref":
            proc = run_tool_here(capsys, *cmd)
        else:
            proc = run_tool(*cmd)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and f"the folder {missing} does not exist" in line, (cmd, line)
        assert not (tmp_path / "no").exists(), cmd  # nothing created on the way


def test_the_library_writers_refuse_a_missing_folder_too(tmp_path):
    from polar_xtuner.errors import UserError
    from polar_xtuner.outputs import atomic_dir, write_json
    from polar_xtuner.rl.prompts import write_rows

    for write in (lambda p: write_json(p, {}), lambda p: write_rows([{"prompt": []}], p, "openrlhf")):
        with pytest.raises(UserError, match=f"the folder {tmp_path / 'no'} does not exist"):
            write(str(tmp_path / "no" / "x.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        with atomic_dir(str(tmp_path / "no" / "d")):
            pass
    assert os.listdir(tmp_path) == []


def _tool_main(name):
    from common import load_tool

    return load_tool(name).main


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_the_tiny_model_tool_follows_the_umask_and_keeps_a_folder_it_was_not_told_to_replace(umask, tmp_path,
                                                                                               capsys):
    main = _tool_main("make_tiny_model")
    out = tmp_path / "tiny"
    old = os.umask(umask)
    try:
        assert main([str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.stat(out / p).st_mode) for p in os.listdir(out)}
    assert "model.safetensors" in modes  # safetensors' writer alone made it 0600
    assert all(m == 0o666 & ~umask for m in modes.values()), {p: oct(m) for p, m in modes.items()}
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([str(mine)]) == 2
    assert "--force" in one_error_line(capsys.readouterr().err)
    assert os.listdir(mine) == ["notes.txt"]
    assert main([str(tmp_path / "no" / "tiny")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    assert main([str(mine), "--force"]) == 2  # --force replaces a model directory, never a user's files
    assert "notes.txt" in one_error_line(capsys.readouterr().err) and os.listdir(mine) == ["notes.txt"]
    stale = out / "model-00001-of-00002.safetensors"  # an earlier sharded model's file: ours to replace
    stale.write_bytes(b"old")
    assert main([str(out), "--force"]) == 0 and not stale.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("flag, name", [
    ("--plot", "scores.txt"), ("--plot", "scores"), ("--out", "report.jsonl"), ("--out", "report.txt"),
    ("--save-scores", "scores.json"), ("--save-scores", "scores.csv"),
])
def test_an_evaluation_output_named_for_another_format_is_refused_before_scoring(flag, name, tiny_dir, tmp_path,
                                                                                  capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(open(VAL, encoding="utf-8").read())
    rc = _tool_main("eval_pref")(["--model", tiny_dir, "--data", str(src), flag, str(tmp_path / name)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: {flag} ") and ("extension" in line), line
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("tool", ["make_tiny_model", "convert", "build_dataset"])
@pytest.mark.parametrize("where", ["a folder", "the working directory"])
def test_replacing_a_directory_never_deletes_files_the_tool_did_not_write(tool, where, pth_run, tmp_path,
                                                                         monkeypatch, capsys):
    """--force (make_tiny_model, convert) and -o (build_dataset) replace only their own kind of files.

    A folder holding a user's other files, `.` included, is refused in one line naming
    them, exit 2, and keeps every file.
    """
    from common import VAL, load_tool

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")  # a model's file name among them changes nothing
    target = str(out)
    if where == "the working directory":
        monkeypatch.chdir(out)
        target = "."
    if tool == "make_tiny_model":
        code = load_tool("make_tiny_model").main([target, "--force"])
    elif tool == "convert":
        from polar_xtuner.convert.export import main

        code = main([pth_run["cfg"], pth_run["ckpt"], target, "--force", "--no-verify"])
    else:
        code = load_tool("build_dataset").main([VAL, "-o", target])
    err = capsys.readouterr().err
    assert code == 2 and "notes.txt" in one_error_line(err) and "did not write" in err, err
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


LONG = "r" * 240  # a legal name; with its temporary sibling's marks it passes the usual 255 bytes


@pytest.mark.parametrize("tool, args", [
    ("eval_pref", ["--data", VAL, "--out", LONG + ".json", "--plot", "f.png"]),
    ("eval_pref", ["--data", VAL, "--save-scores", LONG + ".jsonl", "--out", "r.json"]),
    ("eval_pref", ["--data", VAL, "--plot", LONG + ".png", "--out", "r.json"]),
    ("make_rft_data", [VAL, "-o", LONG + ".jsonl"]),
    ("build_dataset", [VAL, "-o", LONG]),
    ("make_tiny_model", [LONG]),
    ("convert", [LONG]),
], ids=["eval--out", "eval--save-scores", "eval--plot", "rft-o", "build-o", "tiny", "convert"])
def test_an_output_name_too_long_with_its_temporary_sibling_is_refused_before_any_work(tool, args, tiny_dir, pth_run,
                                                                                       tmp_path, monkeypatch, capsys):
    """Checked on the output's own temporary sibling, before scoring or writing: no output appears."""
    from common import load_tool

    monkeypatch.chdir(tmp_path)
    if tool == "eval_pref":
        args = ["--model", tiny_dir, *args]
    if tool == "convert":
        from polar_xtuner.convert.export import main

        code = main([pth_run["cfg"], pth_run["ckpt"], *args, "--no-verify"])
    else:
        code = load_tool(tool).main(args)
    err = capsys.readouterr().err
    assert code == 2 and "the name is too long for this file system" in one_error_line(err), err
    assert os.listdir(tmp_path) == []
