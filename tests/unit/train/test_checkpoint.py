"""The checkpoint layer in-process: what a path, a work dir and its pointer resolve to."""
import pytest

from polar_xtuner.train.checkpoint import POINTER, CheckpointError, checkpoint_in_work_dir, resolve_checkpoint


def _work_dir(tmp_path, pointer_text=None):
    work = tmp_path / "work"
    work.mkdir()
    (work / "iter_5.pth").write_bytes(b"x")
    (work / POINTER).write_text(pointer_text if pointer_text is not None else str(work / "iter_5.pth"))
    return work


def test_a_pth_file_a_deepspeed_dir_and_a_work_dir(tmp_path):
    work = _work_dir(tmp_path)
    assert resolve_checkpoint(str(work / "iter_5.pth")).kind == "pth"
    assert resolve_checkpoint(str(work)).path == str(work / "iter_5.pth")
    ds = tmp_path / "iter_9.pth"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert resolve_checkpoint(str(ds)).kind == "deepspeed"


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "no such file or directory"),
    (lambda p: (p / "empty.pth").write_bytes(b"") or p / "empty.pth", "empty file"),
    (lambda p: (p / "d").mkdir() or p / "d", "empty directory"),
    (lambda p: (p / "e").mkdir() or (p / "e" / "x.txt").write_text("x") and p / "e", "neither a DeepSpeed"),
])
def test_what_is_not_a_checkpoint_is_named(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(str(path))


def test_a_moved_work_dir_uses_its_own_checkpoint_and_says_so(tmp_path, capsys):
    work = _work_dir(tmp_path, pointer_text="/elsewhere/run/iter_5.pth")
    assert checkpoint_in_work_dir(str(work)) == str(work / "iter_5.pth")
    assert "a copied or moved work dir" in capsys.readouterr().err


@pytest.mark.parametrize("pointer, message", [
    ("", "is empty"),
    ("iter_7.pth", "does not exist in"),
    (POINTER, "the pointer or the work dir itself"),
    (".", "the pointer or the work dir itself"),
])
def test_bad_pointers_are_named_with_the_fix(tmp_path, pointer, message):
    work = _work_dir(tmp_path, pointer_text=pointer)
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint_in_work_dir(str(work))
    assert str(work / POINTER) in str(e.value) and "iter_N.pth" in str(e.value)
