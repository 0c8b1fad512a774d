"""build_polar_dataset: the config-facing builder, its cache and its packing."""
import gc
import os
import re
import shutil

import pytest

from common import ASSETS, REPO
from polar_xtuner.data.dataset import build_polar_dataset, cache_key

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def test_cache_is_reused_and_equal(tmp_path, tokenizer, capsys):
    data = str(tmp_path / "val.jsonl")
    shutil.copy(VAL, data)
    cache = str(tmp_path / "cache")
    fresh = build_polar_dataset(data, tokenizer, 512, 128, cache_dir=None)
    first = build_polar_dataset(data, tokenizer, 512, 128, cache_dir=cache)
    assert "cached encoded pairs in" in capsys.readouterr().err
    again = build_polar_dataset(data, tokenizer, 512, 128, cache_dir=cache)
    assert "using cached encoded pairs" in capsys.readouterr().err
    assert len(fresh) == len(first) == len(again) == 200
    assert fresh[:] == first[:] == again[:]
    assert len(os.listdir(cache)) == 1


def test_cache_key_follows_data_and_settings(tmp_path, tokenizer):
    data = str(tmp_path / "val.jsonl")
    shutil.copy(VAL, data)
    key = cache_key([data], tokenizer, 512, 128, None)
    assert cache_key([data], tokenizer, 512, 128, None) == key
    assert cache_key([data], tokenizer, 1024, 128, None) != key
    with open(data, "a") as f:
        f.write(open(VAL).readline())
    assert cache_key([data], tokenizer, 512, 128, None) != key


def test_a_one_byte_edit_that_keeps_size_and_mtime_misses_the_cache(tmp_path, tokenizer, capsys):
    """The key follows the bytes: size and mtime kept, the edited pair is encoded anew."""
    data = str(tmp_path / "val.jsonl")
    shutil.copy(VAL, data)
    cache = str(tmp_path / "cache")
    first = build_polar_dataset(data, tokenizer, 512, 128, cache_dir=cache)
    st = os.stat(data)
    raw = bytearray(open(data, "rb").read())
    # the first answer that starts with an ASCII letter: one byte, the same byte count after the edit
    i = next(m.end() for m in re.finditer(rb'"content": "', raw)
             if raw[m.end()] < 128 and chr(raw[m.end()]).isalpha())
    raw[i] = ord("X") if raw[i] != ord("X") else ord("Y")
    with open(data, "wb") as f:
        f.write(raw)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.path.getsize(data), os.stat(data).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    capsys.readouterr()
    again = build_polar_dataset(data, tokenizer, 512, 128, cache_dir=cache)
    assert "using cached encoded pairs" not in capsys.readouterr().err
    assert again[:] != first[:]  # the edited record's token ids, not the old ones
    assert again[:] == build_polar_dataset(data, tokenizer, 512, 128)[:]


def test_packed_rows_respect_the_limit_and_keep_every_pair(tokenizer):
    ds = build_polar_dataset(VAL, tokenizer, 256, 128, use_varlen_attn=True, max_packed_length=512)
    assert sum((len(ds[i]["cumulative_len"]) - 1) // 2 for i in range(len(ds))) == 200
    assert all(len(ds[i]["input_ids"]) <= 512 for i in range(len(ds)))
    again = build_polar_dataset(VAL, tokenizer, 256, 128, use_varlen_attn=True, max_packed_length=512)
    assert [ds[i]["input_ids"] for i in range(len(ds))] == [again[i]["input_ids"] for i in range(len(ds))]


def test_packed_rows_are_the_same_from_fresh_columns_and_from_the_cache(tokenizer, tmp_path):
    """Fresh encodes pack from plain lists, cache hits from Arrow: one result."""
    kw = dict(use_varlen_attn=True, max_packed_length=512, seed=3)
    fresh = build_polar_dataset(VAL, tokenizer, 256, 128, cache_dir=None, **kw)
    build_polar_dataset(VAL, tokenizer, 256, 128, cache_dir=str(tmp_path), **kw)  # fills the cache
    cached = build_polar_dataset(VAL, tokenizer, 256, 128, cache_dir=str(tmp_path), **kw)
    assert len(fresh) == len(cached) > 1
    for i in range(len(fresh)):
        assert fresh[i] == cached[i], i


def test_packed_rows_equal_xtuners_own_build(tokenizer):
    """Same rows, ids, labels and boundaries as build_preference_dataset(is_reference=True)."""
    from datasets import load_dataset
    from xtuner.dataset.preference_dataset import build_preference_dataset

    kw = dict(max_length=256, max_response_length=128, use_varlen_attn=True, max_packed_length=512,
              shuffle_before_pack=False)
    ours = build_polar_dataset(VAL, tokenizer, reward_token_id=4, cache_dir=None, **kw)
    stock = build_preference_dataset(
        dataset=dict(type=load_dataset, path="json", data_files=VAL), tokenizer=tokenizer, dataset_map_fn=None,
        is_dpo=False, is_reward=True, reward_token_id=4, is_reference=True, num_proc=1, **kw)
    assert len(ours) == len(stock) > 1
    for i in range(len(ours)):
        row = dict(ours[i])
        margins = row.pop("margins")  # ours adds each pair's margin (none in this data: 0)
        assert row == stock[i], i
        assert margins == [0.0] * ((len(row["cumulative_len"]) - 1) // 2)


def test_bad_data_and_settings_exit_with_a_message(tokenizer, capsys, tmp_path):
    bad = os.path.join(ASSETS, "bad_records.jsonl")
    with pytest.raises(SystemExit) as e:
        build_polar_dataset(bad, tokenizer, 512, 128, cache_dir=str(tmp_path))
    assert e.value.code == 2
    assert gc.isenabled()  # the build pauses the cyclic collector; an error must not leave it off
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid JSON" in err and f"{bad}:4: missing field 'reference'" in err
    assert not os.listdir(tmp_path)  # nothing cached from bad data
    with pytest.raises(SystemExit):
        build_polar_dataset(str(tmp_path / "missing.jsonl"), tokenizer, 512, 128)
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, max_packed_length=64)
    assert "longer than max_packed_length=64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_polar_dataset(VAL, tokenizer, 512, 128, reward_token_id=92527)
    assert "set reward_token_id = 4" in capsys.readouterr().err


def test_cache_key_follows_everything_that_changes_the_ids(tmp_path, tiny_dir, monkeypatch):
    """Each tokenizer file, each tokenizer setting, the lengths and the library versions: a new key each."""
    import json
    import shutil

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    data = tmp_path / "d.jsonl"
    data.write_text(open(VAL).readline())
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_dir, tok_dir)

    def key(**kw):
        return cache_key([str(data)], AutoTokenizer.from_pretrained(str(tok_dir), **kw), 512, 128, None)

    base = key()
    assert key() == base and key(padding_side="left") == base  # stable; a batch setting is not the ids'
    assert cache_key([str(data)], AutoTokenizer.from_pretrained(str(tok_dir)), 513, 128, None) != base
    assert cache_key([str(data)], AutoTokenizer.from_pretrained(str(tok_dir)), 512, 128, 7) != base
    changed = set()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    for name, value in (("clean_up_tokenization_spaces", not config.get("clean_up_tokenization_spaces")),
                        ("add_bos_token", False)):  # the example, and another setting
        saved = (tok_dir / "tokenizer_config.json").read_text()
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, name: value}))
        changed.add(key() != base)
        (tok_dir / "tokenizer_config.json").write_text(saved)
    for name in ("special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenization_internlm2.py"):
        path = tok_dir / name
        saved = path.read_bytes() if path.exists() else None
        if name.endswith(".json"):  # the same content written otherwise: the file's digest is what counts
            path.write_text(json.dumps(json.loads(path.read_text()), indent=3))
        else:
            path.write_bytes(b"a tokenizer file that appeared")
        changed.add(key() != base)
        path.unlink()
        if saved is not None:
            path.write_bytes(saved)
    assert key() == base
    for module in (transformers, tokenizers):
        monkeypatch.setattr(module, "__version__", module.__version__ + ".post1")
        changed.add(key() != base)
        monkeypatch.undo()
    assert changed == {True}
