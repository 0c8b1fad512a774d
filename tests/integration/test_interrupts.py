"""SIGINT and SIGTERM at any moment leave the old outputs as they were, exit 130/143 (issue 27, class 5).

A Ctrl-C during the converter's start was swallowed: ``import deepspeed``
compiles test programs (its op builders' compatibility probes) inside a bare
``except:``, which caught the KeyboardInterrupt, and the conversion then
replaced OUT_DIR and exited 0. Now the interrupt is sticky (raised again until
``entry.run`` has it), outputs replaced during the run are put back, and the
swap of an output runs with signals deferred.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from common import REPO, VAL, one_error_line, snapshot

pytestmark = pytest.mark.integration

MOMENTS = [0.2, 1.0, 3.0, "mid-write"]


def signal_at(cmd, moment, sig, writing):
    """Run ``cmd``, send ``sig`` after ``moment`` seconds or once ``writing()`` is true; (rc, stderr, sent at)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if (writing() if moment == "mid-write" else time.monotonic() - t0 >= moment):
                proc.send_signal(sig)
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, time.monotonic() - t0


def check_interrupted(rc, err, sig, out, before, moment):
    assert rc == 128 + sig, (moment, sig, rc, err[-2000:])
    line = one_error_line(err)
    assert ("interrupted" if sig == signal.SIGINT else "terminated") in line, line
    assert snapshot(out) == before, (moment, sig)
    assert glob.glob(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.*")) == [], (moment, sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_convert_interrupted_at_any_moment_keeps_the_old_model(sig, pth_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("the previous model")  # a model's file: --force replaces it
    before = snapshot(out)

    def writing():  # the new model is on disk beside OUT_DIR, being verified
        return bool(glob.glob(str(tmp_path / ".hf.tmp-*" / "model.safetensors")))

    cmd = ["bash", "tools/convert.sh", pth_run["cfg"], pth_run["ckpt"], str(out), "--force"]
    for moment in MOMENTS:
        rc, err, _ = signal_at(cmd, moment, sig, writing)
        check_interrupted(rc, err, sig, str(out), before, moment)


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """Records enough for a build of several seconds."""
    path = tmp_path_factory.mktemp("big") / "in.jsonl"
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(200_000):
            words = " ".join(str(rng.random()) for _ in range(8))
            f.write(json.dumps({"prompt": "q", "reference": "r", "chosen": f"a{i} {words}", "rejected": f"b{i}"})
                    + "\n")
    return str(path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_build_interrupted_at_any_moment_keeps_the_old_outputs(sig, big_input, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/build_dataset.py", VAL, "-o", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before = snapshot(out)

    def writing():
        return any(os.path.getsize(p) > 0 for p in glob.glob(str(tmp_path / ".out.tmp-*" / "train.jsonl")))

    cmd = [sys.executable, "tools/build_dataset.py", big_input, "-o", str(out), "--val-ratio", "0.1"]
    for moment in MOMENTS:
        rc, err, took = signal_at(cmd, moment, sig, writing)
        check_interrupted(rc, err, sig, str(out), before, moment)


SWALLOWING_TOOL = textwrap.dedent("""
    import os, signal, sys, time
    from polar_xtuner.cli.entry import cli
    from polar_xtuner.outputs import atomic_dir

    def main(argv=None):
        with atomic_dir(sys.argv[1]) as work:
            open(os.path.join(work, "new.txt"), "w").write("new")
            try:  # what deepspeed's op-builder probes do around a compiler run
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            except:  # noqa: E722
                pass
            time.sleep(30)  # a long conversion goes on, unless the interrupt comes back
        return 0

    cli(main)
""")


def test_an_interrupt_a_library_swallows_is_raised_again(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    script = tmp_path / "tool.py"
    script.write_text(SWALLOWING_TOOL)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 15, proc.stderr[-2000:]
    assert "interrupted" in one_error_line(proc.stderr)
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out", "tool.py"]


class Escaped(Exception):
    """A signal that reached the test's own handler: the run under test did not take it."""


@pytest.fixture
def own_handlers():
    """Signals to this process fail the test (not the session) unless the run under test handles them."""
    def escaped(signum, _frame):
        raise Escaped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, escaped) for s in (signal.SIGINT, signal.SIGTERM)}
    yield escaped
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_swap_or_after_it_puts_every_output_back(sig, tmp_path, monkeypatch, capsys,
                                                                      own_handlers):
    import polar_xtuner.outputs as outputs
    from polar_xtuner.cli.entry import run

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("old dir")
    (tmp_path / "r.json").write_text("old file")
    before = {p: snapshot(tmp_path / p) if p == "d" else (tmp_path / p).read_text() for p in ("d", "r.json")}
    exchange = outputs._exchange

    def exchange_then_signal(a, b):  # the signal lands while the directory is being swapped
        done = exchange(a, b)
        os.kill(os.getpid(), sig)
        return done

    def main(argv):
        outputs.write_json(str(tmp_path / "r.json"), {"new": True})  # committed before the signal
        outputs.write_json(str(tmp_path / "created.json"), {})  # a new output: removed again
        monkeypatch.setattr(outputs, "_exchange", exchange_then_signal)
        with outputs.atomic_dir(str(tmp_path / "d")) as work:
            open(os.path.join(work, "f"), "w").write("new dir")
        raise AssertionError("the signal did not stop the run")

    assert run(main) == 128 + sig
    assert "outputs were left as they were" in one_error_line(capsys.readouterr().err)
    assert snapshot(tmp_path / "d") == before["d"] and (tmp_path / "r.json").read_text() == before["r.json"]
    assert sorted(os.listdir(tmp_path)) == ["d", "r.json"]
    assert signal.getsignal(sig) is own_handlers  # an in-process run gives the handlers back


def test_a_signal_after_main_returned_changes_nothing(tmp_path, capsys, own_handlers):
    """Once the run has decided (exit 0, new outputs), a late signal neither undoes nor interrupts it."""
    from polar_xtuner.cli.entry import run
    from polar_xtuner.outputs import Transaction, write_json

    commit = Transaction.commit

    def commit_then_signal(self):
        os.kill(os.getpid(), signal.SIGINT)
        commit(self)

    def main(argv):
        write_json(str(tmp_path / "r.json"), {"new": True})
        return 0

    (tmp_path / "r.json").write_text("old")
    Transaction.commit = commit_then_signal
    try:
        assert run(main) == 0
    finally:
        Transaction.commit = commit
    assert json.loads((tmp_path / "r.json").read_text()) == {"new": True}
    assert os.listdir(tmp_path) == ["r.json"]


LATE_SIGNAL_TOOL = """
import atexit, os, signal, sys, time

from polar_xtuner.cli.entry import cli, start_tool
from polar_xtuner.outputs import atomic_file

start_tool()


def at_shutdown():
    # What interpreter shutdown does (signal module finalization): a Python-level handler goes back to
    # the default action, an ignored signal stays ignored. Then a scheduler's late SIGTERM arrives.
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)


atexit.register(at_shutdown)


def main(argv):
    with atomic_file(sys.argv[1]) as tmp:
        open(tmp, "w").write("the new output")
    return 0


cli(main)
"""


def test_a_signal_after_the_output_is_complete_exits_0(tmp_path):
    """143 says "outputs left as they were": a SIGTERM once the new output is in place must not say it."""
    script = tmp_path / "tool.py"
    script.write_text(LATE_SIGNAL_TOOL)
    out = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert out.read_text() == "the new output" and "error" not in proc.stderr
