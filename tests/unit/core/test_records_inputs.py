"""polar_xtuner.records' inputs: read once, front to back, whatever the file is (issue #42).

A pipe, a FIFO or ``/dev/stdin`` under a pipe gives every record a regular file
gives; the format sniff loses nothing; a FIFO with no writer, a device or an
endless line ends in one named error instead of a hang or a MemoryError.
"""
import gzip
import os
import subprocess
import threading

import pytest

import polar_xtuner.records as records
from common import REPO
from polar_xtuner.records import DataError, iter_records

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def _records(path):
    return [item.record for item in iter_records(path)]


def _fifo_fed(tmp_path, name, payload: bytes):
    """A FIFO whose writer (a thread) sends ``payload`` once a reader opens it."""
    fifo = tmp_path / name
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(payload)

    threading.Thread(target=write, daemon=True).start()
    return str(fifo)


@pytest.mark.parametrize("name, encode", [("val.jsonl", lambda b: b), ("val.jsonl.gz", gzip.compress),
                                          ("val.json", None)])
def test_a_fifo_gives_every_record_a_file_gives(tmp_path, name, encode):
    want = _records(VAL)
    raw = open(VAL, "rb").read()
    if encode is None:  # a JSON array
        import json

        raw = json.dumps([json.loads(line) for line in raw.decode().splitlines()]).encode()
        encode = lambda b: b  # noqa: E731
    assert _records(_fifo_fed(tmp_path, name, encode(raw))) == want and len(want) == 200


def test_a_pipe_through_dev_stdin_and_process_substitution_lose_nothing():
    """The issue's cases: `<(cat val.jsonl)` and `cat | ... /dev/stdin` (the sniff used to eat the first 4 KiB)."""
    code = ("import sys; from polar_xtuner.records import iter_records; "
            "print(sum(1 for _ in iter_records(sys.argv[1])))")
    out = subprocess.run(["bash", "-c", f'python -c "{code}" <(cat {VAL}); cat {VAL} | python -c "{code}" /dev/stdin'],
                         capture_output=True, text=True, env=dict(os.environ, PATH=os.path.dirname(
                             __import__("sys").executable) + os.pathsep + os.environ["PATH"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["200", "200"]


def test_a_fifo_with_no_writer_fails_in_one_named_line(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "STREAM_FIRST_BYTE_TIMEOUT_S", 0.3)
    fifo = tmp_path / "lonely.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="lonely.jsonl: a pipe or FIFO that gave nothing within 0.3 s"):
        list(iter_records(str(fifo)))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_device_is_refused_before_anything_is_read(device):
    with pytest.raises(DataError, match=f"{device}: is a terminal or character device, not a data file"):
        list(iter_records(device))


def test_a_line_past_the_limit_names_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_bytes(open(VAL, "rb").readline() + b"x" * 5000)  # a line with no end, as /dev/zero
    with pytest.raises(DataError, match=r"long.jsonl:2: a line of more than"):
        list(iter_records(str(path)))


def test_parquet_from_a_stream_is_refused_and_training_takes_files_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "reference": ["r"], "chosen": ["a"], "rejected": ["b"]}), table)
    assert len(_records(str(table))) == 1
    with pytest.raises(DataError, match="Parquet is read from its end"):
        list(iter_records(_fifo_fed(tmp_path, "t2.parquet", table.read_bytes())))
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="training reads its data on every rank"):
        records.require_regular_file(str(fifo), "training reads its data on every rank and keys its cache by the content")


@pytest.mark.parametrize("tool", ["eval_pref", "build_dataset", "make_rft_data"])
def test_every_tool_reads_a_fifo_whole(tool, tiny_dir, tmp_path, monkeypatch, capsys):
    """Each tool that reads data, through its main(): the counts it reports are the file's."""
    import json

    from common import load_tool

    monkeypatch.chdir(tmp_path)
    fifo = _fifo_fed(tmp_path, "in.jsonl", open(VAL, "rb").read())
    if tool == "eval_pref":
        assert load_tool(tool).main(["--model", tiny_dir, "--data", fifo, "--out", "r.json"]) == 0
        assert json.load(open("r.json"))["records"] == 200
    elif tool == "build_dataset":
        assert load_tool(tool).main([fifo, "-o", "out"]) == 0
        assert sum(1 for _ in open("out/train.jsonl")) == 200
    else:  # the same prompts as from the file itself
        assert load_tool(tool).main([fifo, "-o", "rl.jsonl"]) == 0
        assert load_tool(tool).main([VAL, "-o", "rl_file.jsonl"]) == 0
        assert open("rl.jsonl").read() == open("rl_file.jsonl").read() and os.path.getsize("rl.jsonl") > 0
    capsys.readouterr()
