"""The encoded-pairs cache: concurrent builders, corrupt entries, hits that encode nothing."""
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import traceback

import pytest

from conftest import REPO
from polar_xtuner import dataset as D
from polar_xtuner.schema import DataError

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")
ROUNDS = 20
WORKERS = 3


def _digest(columns: dict) -> str:
    return hashlib.sha1(json.dumps({c: columns[c] for c in (*D.PAIR_COLUMNS, "length")},
                                   sort_keys=True).encode()).hexdigest()


def _siblings(cache: str) -> list[str]:
    return sorted(os.listdir(cache))


def _worker(tiny_dir, data, cache_root, rounds, barrier, results):
    """One builder: every round, start with the others and build (or load) the round's cache."""
    from transformers import AutoTokenizer

    from polar_xtuner import dataset as Dw

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    encoded = []
    real_encode = Dw.encode_records

    def counting_encode(*a, **kw):
        encoded.append(1)
        return real_encode(*a, **kw)

    Dw.encode_records = counting_encode
    for r in range(rounds):
        barrier.wait(timeout=120)  # every builder starts the round at the same instant
        encoded.clear()
        err, sys.stderr = sys.stderr, io.StringIO()
        try:
            ds = Dw.encoded_pairs([data], tokenizer, 512, 128, None, cache_dir=os.path.join(cache_root, str(r)))
            results.put((r, "ok", _digest(ds[:]), bool(encoded), sys.stderr.getvalue()))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((r, "error", traceback.format_exc(), bool(encoded), sys.stderr.getvalue()))
        finally:
            sys.stderr = err


def _corrupt_copy(entry: str, dst: str) -> None:
    """A copy of a whole entry with its arrow file cut in half."""
    shutil.copytree(entry, dst)
    arrow = os.path.join(dst, "data-00000-of-00001.arrow")
    os.truncate(arrow, os.path.getsize(arrow) // 2)


def test_concurrent_builders_all_succeed_and_agree(tmp_path, tiny_dir, tokenizer):
    data = str(tmp_path / "pairs.jsonl")
    with open(VAL) as src, open(data, "w") as dst:
        dst.writelines(src.readlines()[:60])  # small: the rounds are about the race, not the encoding
    want = _digest(D.build_polar_dataset(data, tokenizer, 512, 128, cache_dir=None)[:])
    key = D.cache_key([data], tokenizer, 512, 128, None)
    seed = str(tmp_path / "seed")
    D.encoded_pairs([data], tokenizer, 512, 128, None, cache_dir=seed)
    cache_root = tmp_path / "caches"
    for r in range(1, ROUNDS, 2):  # odd rounds start from a corrupt entry, which every builder finds
        _corrupt_copy(os.path.join(seed, key), str(cache_root / str(r) / key))

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tiny_dir, data, str(cache_root), ROUNDS, barrier, results))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=300) for _ in range(ROUNDS * WORKERS)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"round {r}: {text}" for r, status, text, _, _ in got if status != "ok"]
    assert not errors, "\n".join(errors)
    assert {text for _, _, text, _, _ in got} == {want}
    for r in range(ROUNDS):
        assert _siblings(str(cache_root / str(r))) == [key], r  # one entry, no temp or corrupt leftovers
        assert D._check_manifest(str(cache_root / str(r) / key))[0] is None
    overlapped = sum(sum(enc for rr, _, _, enc, _ in got if rr == r) >= 2 for r in range(ROUNDS))
    assert overlapped >= ROUNDS // 4, f"builders overlapped in only {overlapped} of {ROUNDS} rounds"
    for r in range(1, ROUNDS, 2):  # someone found each seeded corrupt entry, and said so
        assert any("is corrupt (" in err for rr, _, _, _, err in got if rr == r), r


@pytest.mark.parametrize("damage", ["truncated arrow", "flipped byte", "no manifest", "garbled manifest",
                                    "missing file"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, tokenizer, capsys, damage):
    cache = str(tmp_path / "cache")
    first = D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)[:]
    entry = os.path.join(cache, D.cache_key([VAL], tokenizer, 512, 128, None))
    arrow = os.path.join(entry, "data-00000-of-00001.arrow")
    manifest = os.path.join(entry, D.CACHE_MANIFEST)
    capsys.readouterr()
    if damage == "truncated arrow":
        os.truncate(arrow, os.path.getsize(arrow) - 100)
    elif damage == "flipped byte":  # same size: only the checksum can tell
        with open(arrow, "r+b") as f:
            f.seek(os.path.getsize(arrow) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x10]))
    elif damage == "no manifest":
        os.remove(manifest)
    elif damage == "garbled manifest":
        with open(manifest, "w") as f:
            f.write('{"polar_cache": 1, "files": {')
    else:
        os.remove(os.path.join(entry, "state.json"))
    again = D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)[:]
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if "is corrupt" in line]
    assert len(said) == 1, err
    assert said[0].startswith(f"polar_xtuner: cache entry {entry} is corrupt (") and said[0].endswith("); rebuilding")
    assert f"polar_xtuner: cached encoded pairs in {entry}" in err
    assert again == first
    assert _siblings(cache) == [os.path.basename(entry)]
    assert D._check_manifest(entry)[0] is None
    D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)
    assert f"polar_xtuner: using cached encoded pairs {entry}" in capsys.readouterr().err


def test_hit_neither_reads_nor_encodes_the_data(tmp_path, tokenizer, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    first = D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)[:]
    entry = os.path.join(cache, D.cache_key([VAL], tokenizer, 512, 128, None))
    with open(os.path.join(entry, D.CACHE_MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["rows"] == 200
    assert set(manifest["files"]) == {"data-00000-of-00001.arrow", "dataset_info.json", "state.json"}
    capsys.readouterr()

    def refuse(*a, **kw):
        raise AssertionError("a cache hit read or encoded the data")

    monkeypatch.setattr(D, "load_records", refuse)
    monkeypatch.setattr(D, "encode_records", refuse)
    assert D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)[:] == first
    assert capsys.readouterr().err.strip() == f"polar_xtuner: using cached encoded pairs {entry}"


def test_stale_temps_of_dead_builders_go_live_ones_stay(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    key = D.cache_key([VAL], tokenizer, 512, 128, None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        names = {"dead": f"{key}.tmp-{host}-{dead.pid}-0a1b2c3d",
                 "dead_aside": f"{key}.corrupt-{host}-{dead.pid}-0a1b2c3e",
                 "old_style": f"{key}.tmp{dead.pid}",
                 "live": f"{key}.tmp-{host}-{live.pid}-0a1b2c3f",
                 "other_host": f"{key}.tmp-not-{host}-{dead.pid}-0a1b2c40"}
        for name in names.values():
            os.makedirs(cache / name / "x")
        D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=str(cache))
        assert _siblings(str(cache)) == sorted([key, names["live"], names["other_host"]])
    finally:
        live.kill()
        live.wait()


def test_unwritable_cache_dir_is_one_clear_error(tmp_path, tokenizer):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = str(blocker / "cache")  # under a file: no user, root included, can write there
    with pytest.raises(DataError) as e:
        D.encoded_pairs([VAL], tokenizer, 512, 128, None, cache_dir=cache)
    text = str(e.value)
    assert "\n" not in text and f"cannot write the data cache in {cache}" in text
    assert "set cache_dir to another directory" in text
    with pytest.raises(SystemExit) as exit_:
        D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)
    assert exit_.value.code == 2
