"""Shared-prefix groups (polar_xtuner/data/shared_prefix.py): every pair kept exactly, rows of whole groups, the cache."""
import os

import pytest

from common import REPO
from polar_xtuner.data.dataset import build_polar_dataset, polar_collate_fn
from polar_xtuner.data.shared_prefix import GroupRows, columns_to_groups, group_records, groups_to_columns
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.records import DataError, load_records

VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def _pairs_of(groups):
    return sorted((tuple(g.sequence(i)), tuple(g.sequence(j)), m) for g in groups for i, j, m in g.pairs)


def _expected(records, encoder):
    feats = encoder.encode_pairs(records)
    return sorted((tuple(f["chosen_ids"]), tuple(f["rejected_ids"]), float(r.get("margin", 0.0)))
                  for f, r in zip(feats, records))


def _shared_prompt_records():
    """Four records per prompt and reference, with margins, one with equal answers, one in the pretrain wrapper."""
    base = load_records(VAL)[:12]
    out = []
    for p in range(3):
        for r in range(4):
            other = base[3 + 3 * p + (r % 3)]
            out.append({**base[p], "chosen": base[p]["chosen"] if r == 0 else other["chosen"],
                        "rejected": other["rejected"], "margin": float(r)})
    out.append({**base[0], "rejected": base[0]["chosen"]})  # equal answers: still a pair
    out.append({**base[1], "wrapper": "pretrain"})  # another wrapper, another prefix
    return out


@pytest.mark.parametrize("max_length, max_tokens", [(512, 4096), (512, 180), (40, 4096)],
                         ids=["whole groups", "split groups", "truncated prompts"])
def test_groups_hold_exactly_the_encoded_pairs(tokenizer, max_length, max_tokens):
    records = _shared_prompt_records()
    encoder = PolarEncoder(tokenizer, max_length, 64)
    groups, report = group_records(records, encoder, max_tokens)
    assert _pairs_of(groups) == _expected(records, encoder)  # nothing dropped, nothing changed
    assert all(g.tokens <= max_tokens for g in groups)
    assert report.pairs == report.records == len(records)
    assert report.groups == len(groups) and report.shared_tokens == sum(g.tokens for g in groups)
    if max_tokens == 4096 and max_length == 512:
        assert report.groups == 4  # three prompts (the equal-answers record joins the first), the pretrain wrapper's
        assert report.token_ratio > 1.5
    assert "pairs in" in report.line() and "fewer" in report.line()


def test_groups_round_trip_through_columns(tokenizer):
    groups, _ = group_records(_shared_prompt_records(), PolarEncoder(tokenizer, 512, 64), 4096)
    assert columns_to_groups(groups_to_columns(groups)) == groups
    from datasets import Dataset

    assert columns_to_groups(Dataset.from_dict(groups_to_columns(groups))) == groups


def test_a_pair_longer_than_a_row_is_an_error_not_a_drop(tokenizer):
    with pytest.raises(DataError, match="longer than max_packed_length=20"):
        group_records(_shared_prompt_records(), PolarEncoder(tokenizer, 512, 64), 20)


def test_rows_hold_whole_groups_in_a_seeded_order(tokenizer):
    groups, _ = group_records(load_records(VAL), PolarEncoder(tokenizer, 512, 128), 1024)
    rows = GroupRows(groups, 1024, shuffle=True, seed=3)
    packed = [g for i in range(len(rows)) for g in rows[i]["groups"]]
    assert sorted(map(repr, packed)) == sorted(map(repr, groups))
    assert all(sum(g.tokens for g in rows[i]["groups"]) <= 1024 for i in range(len(rows)))
    again = GroupRows(groups, 1024, shuffle=True, seed=3)
    assert [r["groups"] for r in again] == [r["groups"] for r in rows]
    assert [r["groups"] for r in GroupRows(groups, 1024, seed=4)] != [r["groups"] for r in rows]


def test_built_dataset_collates_rows_the_model_reads_and_caches_apart_from_pairs(tokenizer, tmp_path):
    cache = str(tmp_path / "cache")
    pairs = build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, cache_dir=cache)
    shared = build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, cache_dir=cache, shared_prefix=True)
    assert len(os.listdir(cache)) == 2  # one entry each: the setting is in the key
    again = build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, cache_dir=cache, shared_prefix=True)
    assert [r["groups"] for r in again] == [r["groups"] for r in shared]
    assert len(shared) < len(pairs)
    batch = polar_collate_fn([shared[0]], use_varlen_attn=True)["data"]
    row = batch["shared_prefix"]
    assert batch["input_ids"].shape == (1, len(row.input_ids)) and batch["cumulative_len"][0][-1] == len(row.input_ids)
    assert len(row.pairs) == sum(len(g.pairs) for g in shared[0]["groups"])
    with pytest.raises(ValueError, match="batch size of 1"):
        polar_collate_fn([shared[0], shared[1]], use_varlen_attn=True)


def test_shared_prefix_without_packing_is_one_line_and_exit_2(tokenizer, capsys):
    with pytest.raises(SystemExit) as e:
        build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=False, shared_prefix=True)
    assert e.value.code == 2 and "shared_prefix = True needs use_varlen_attn = True" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, shared_prefix="yes")


def test_the_earlier_name_share_prefix_still_works_and_a_contradiction_is_refused(tokenizer, capsys):
    """Configs written before the rename pass share_prefix=...; it is the same switch."""
    old = build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, share_prefix=True)
    new = build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, shared_prefix=True)
    assert len(old) == len(new) and old[0]["groups"] == new[0]["groups"]  # rows of shared-prefix groups
    with pytest.raises(SystemExit) as e:
        build_polar_dataset(VAL, tokenizer, 512, 128, use_varlen_attn=True, shared_prefix=False, share_prefix=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "share_prefix = True and shared_prefix = False disagree" in err, err
