"""The encoded-pairs cache: concurrent builders, corrupt entries, hits that encode nothing."""
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import time
import traceback

import pytest

from common import VAL
from polar_xtuner.data import cache as C
from polar_xtuner.data import dataset as D
from polar_xtuner.records import DataError

ROUNDS = 20
WORKERS = 3
CORRUPT_ROUNDS = range(1, ROUNDS, 4)  # the others start empty (the old rmtree race failed 3-4 in 10 of those)


def _digest(columns: dict) -> str:
    return hashlib.sha1(json.dumps({c: columns[c] for c in (*D.PAIR_COLUMNS, "length")},
                                   sort_keys=True).encode()).hexdigest()


def _siblings(cache: str) -> list[str]:
    return sorted(os.listdir(cache))


def _said(err: str) -> str:
    """Our lines of a stderr capture (without datasets' progress bars)."""
    return "".join(line + "\n" for line in err.splitlines() if line.startswith("polar_xtuner:"))


# Spawned processes import torch, xtuner and datasets (~10 s on 2 cores): one
# pool of warm workers serves the concurrency and the multi-rank test.
_BARRIER = None  # in a worker: the barrier all workers were started with
_TOKENIZERS: dict = {}


def _serve(tasks, results, barrier):
    global _BARRIER
    _BARRIER = barrier  # (unpickling _serve imported this module, and with it polar_xtuner.data.dataset)
    while (task := tasks.get()) is not None:
        name, args = task
        try:
            results.put((True, globals()[name](*args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((False, traceback.format_exc()))


class _Pool:
    def __init__(self, n):
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(n)  # kept: its semaphore lives as long as this reference
        self.queues = [(ctx.Queue(), ctx.Queue()) for _ in range(n)]
        self.procs = [ctx.Process(target=_serve, args=(tasks, results, self.barrier), daemon=True)
                      for tasks, results in self.queues]
        for p in self.procs:
            p.start()

    def run(self, name, args_per_worker, timeout=300):
        """Run globals()[name](*args) in the first len(args_per_worker) workers at once; their results."""
        for (tasks, _), args in zip(self.queues, args_per_worker):
            tasks.put((name, args))
        out = [self._get(i, timeout) for i in range(len(args_per_worker))]
        assert all(ok for ok, _ in out), "\n".join(value for ok, value in out if not ok)
        return [value for _, value in out]

    def _get(self, i, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.queues[i][1].get(timeout=1)
            except queue.Empty:
                assert self.procs[i].is_alive(), f"worker {i} died (exit code {self.procs[i].exitcode})"
        raise AssertionError(f"worker {i} gave no result in {timeout} s")

    def close(self):
        for tasks, _ in self.queues:
            tasks.put(None)
        for p in self.procs:  # stateless: no need to wait for a slow interpreter exit
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def pool():
    p = _Pool(WORKERS)
    yield p
    p.close()


def _tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    if tiny_dir not in _TOKENIZERS:
        _TOKENIZERS[tiny_dir] = AutoTokenizer.from_pretrained(tiny_dir)
    return _TOKENIZERS[tiny_dir]


@contextlib.contextmanager
def _patched_encode(replacement):
    real = D.encode_records
    D.encode_records = replacement(real)
    try:
        yield
    finally:
        D.encode_records = real


@contextlib.contextmanager
def _captured_stderr():
    err, sys.stderr = sys.stderr, io.StringIO()
    try:
        yield sys.stderr
    finally:
        sys.stderr = err


def _build_rounds(tiny_dir, data, cache_root, rounds):
    """One builder: every round, start with the others and build (or load) the round's cache.

    Returns (round, "ok" or "error", data digest or traceback, whether it encoded, its lines).
    """
    tokenizer = _tokenizer(tiny_dir)
    encoded = []

    def counting(real):
        def encode(*a, **kw):
            encoded.append(1)
            return real(*a, **kw)
        return encode

    out = []
    with _patched_encode(counting):
        for r in range(rounds):
            _BARRIER.wait(timeout=120)  # every builder starts the round at the same instant
            encoded.clear()
            with _captured_stderr() as err:
                try:
                    ds = D.encoded_pairs([data], tokenizer, 512, 128, None,
                                         cache_dir=os.path.join(cache_root, str(r)))
                    out.append((r, "ok", _digest(ds[:]), bool(encoded), _said(err.getvalue())))
                except Exception:  # noqa: BLE001 - the test fails with it
                    out.append((r, "error", traceback.format_exc(), bool(encoded), _said(err.getvalue())))
    return out


def _corrupt_copy(entry: str, dst: str) -> None:
    """A copy of a whole entry with its arrow file cut in half."""
    shutil.copytree(entry, dst)
    arrow = os.path.join(dst, "data-00000-of-00001.arrow")
    os.truncate(arrow, os.path.getsize(arrow) // 2)


def _small_data(tmp_path) -> str:
    data = str(tmp_path / "pairs.jsonl")
    with open(VAL) as src, open(data, "w") as dst:
        dst.writelines(src.readlines()[:60])  # small: these tests are about races, not the encoding
    return data


def test_concurrent_builders_all_succeed_and_agree(tmp_path, tiny_dir, tokenizer, pool):
    data = _small_data(tmp_path)
    want = _digest(D.build_polar_dataset(data, tokenizer, 512, 128, cache_dir=None)[:])
    key = C.cache_key([data], tokenizer, 512, 128, None)
    seed = str(tmp_path / "seed")
    D.encoded_pairs([data], tokenizer, 512, 128, None, cache_dir=seed)
    cache_root = tmp_path / "caches"
    for r in CORRUPT_ROUNDS:  # these start from a corrupt entry, which every builder finds
        _corrupt_copy(os.path.join(seed, key), str(cache_root / str(r) / key))

    got = [row for rows in pool.run("_build_rounds", [(tiny_dir, data, str(cache_root), ROUNDS)] * WORKERS)
           for row in rows]
    errors = [f"round {r}: {text}" for r, status, text, _, _ in got if status != "ok"]
    assert not errors, "\n".join(errors)
    assert len(got) == ROUNDS * WORKERS
    assert {text for _, _, text, _, _ in got} == {want}
    for r in range(ROUNDS):
        assert _siblings(str(cache_root / str(r))) == [key], r  # one entry, no temp or corrupt leftovers
        assert C._check_manifest(str(cache_root / str(r) / key))[0] is None
    overlapped = sum(sum(enc for rr, _, _, enc, _ in got if rr == r) >= 2 for r in range(ROUNDS))
    assert overlapped >= ROUNDS // 4, f"builders overlapped in only {overlapped} of {ROUNDS} rounds"
    for r in CORRUPT_ROUNDS:  # someone found each seeded corrupt entry, and said so
        assert any("is corrupt (" in err for rr, _, _, _, err in got if rr == r), r


def _rank(rank, world, store, tiny_dir, data, cache):
    """One rank of a CPU process group: a miss, a hit, then a corrupt entry; {phase: (digest, lines)}."""
    import torch.distributed as dist

    def refuse(real):
        def encode(*a, **kw):
            raise AssertionError("only rank 0 encodes")
        return encode if rank else real

    tokenizer = _tokenizer(tiny_dir)
    entry = os.path.join(cache, C.cache_key([data], tokenizer, 512, 128, None))
    out = {}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        with _patched_encode(refuse):
            for phase in ("miss", "hit", "corrupt"):
                if phase == "corrupt" and rank == 0:
                    os.truncate(os.path.join(entry, "data-00000-of-00001.arrow"), 1000)
                dist.barrier()
                with _captured_stderr() as err:
                    ds = D.encoded_pairs([data], tokenizer, 512, 128, None, cache_dir=cache)
                out[phase] = (_digest(ds[:]), _said(err.getvalue()))
                del ds
                dist.barrier()
    finally:
        dist.destroy_process_group()
    return out


def test_ranks_validate_rank0_builds_all_load(tmp_path, tiny_dir, tokenizer, pool):
    data = _small_data(tmp_path)
    want = _digest(D.build_polar_dataset(data, tokenizer, 512, 128, cache_dir=None)[:])
    cache = str(tmp_path / "cache")
    entry = os.path.join(cache, C.cache_key([data], tokenizer, 512, 128, None))
    store = str(tmp_path / "store")
    got = pool.run("_rank", [(r, 2, store, tiny_dir, data, cache) for r in range(2)])
    assert {digest for ranks in got for digest, _ in ranks.values()} == {want}
    assert got[0]["miss"][1] == f"polar_xtuner: cached encoded pairs in {entry}\n"
    assert got[1]["miss"][1] == ""
    for rank in (0, 1):
        assert got[rank]["hit"][1] == f"polar_xtuner: using cached encoded pairs {entry}\n"
    size = os.path.getsize(os.path.join(entry, "data-00000-of-00001.arrow"))
    assert got[0]["corrupt"][1].splitlines() == [
        f"polar_xtuner: cache entry {entry} is corrupt (data-00000-of-00001.arrow is 1000 bytes, "
        f"its manifest says {size}); rebuilding",
        f"polar_xtuner: cached encoded pairs in {entry}"]
    assert "corrupt" not in got[1]["corrupt"][1]
    assert _siblings(cache) == [os.path.basename(entry)]


@pytest.mark.parametrize("damage", ["truncated arrow", "flipped byte", "no manifest", "garbled manifest",
                                    "missing file"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, tokenizer, capsys, damage):
    cache = str(tmp_path / "cache")
    first = D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)[:]
    entry = os.path.join(cache, C.cache_key([VAL], tokenizer, 512, 128, None))
    arrow = os.path.join(entry, "data-00000-of-00001.arrow")
    manifest = os.path.join(entry, C.CACHE_MANIFEST)
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
    assert C._check_manifest(entry)[0] is None
    D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)
    assert f"polar_xtuner: using cached encoded pairs {entry}" in capsys.readouterr().err


def test_hit_neither_reads_nor_encodes_the_data(tmp_path, tokenizer, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    first = D.build_polar_dataset(VAL, tokenizer, 512, 128, cache_dir=cache)[:]
    entry = os.path.join(cache, C.cache_key([VAL], tokenizer, 512, 128, None))
    with open(os.path.join(entry, C.CACHE_MANIFEST)) as f:
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
    key = C.cache_key([VAL], tokenizer, 512, 128, None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = C._owner()  # the host and pid namespace the pids are from
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
