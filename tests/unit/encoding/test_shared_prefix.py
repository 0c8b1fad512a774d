"""Shared-prefix rows (polar_xtuner/encoding/shared_prefix.py): layout, splitting, and attention equal to each sequence alone."""
import pytest
import torch

from polar_xtuner.encoding.shared_prefix import Group, dense_mask, pack_groups, split_prefix
from polar_xtuner.train.shared_prefix_attention import prefix_attention
from polar_xtuner.records import DataError
from samples import random_row


def test_split_prefix_takes_the_longest_common_run_and_leaves_every_candidate_a_token():
    assert split_prefix([[1, 2, 3, 9], [1, 2, 4, 9], [1, 2, 3, 5, 9]]) == ([1, 2], [[3, 9], [4, 9], [3, 5, 9]])
    # identical sequences (a pair of equal answers) still keep their reward token apart
    assert split_prefix([[1, 2, 9], [1, 2, 9]]) == ([1, 2], [[9], [9]])
    # a shorter sequence bounds the prefix: one token of it stays a candidate
    assert split_prefix([[1, 2, 3], [1, 2]]) == ([1], [[2, 3], [2]])
    assert split_prefix([[5, 6]]) == ([5], [[6]])
    with pytest.raises(ValueError):
        split_prefix([])
    with pytest.raises(ValueError):
        split_prefix([[1], []])


def test_group_counts_tokens_and_rebuilds_each_sequence():
    seqs = [[1, 2, 3, 4, 9], [1, 2, 3, 5, 6, 9], [1, 2, 3, 7, 9]]
    g = Group.from_sequences(seqs, [(0, 1, 0.5), (0, 2, 0.0), (2, 1, 2.0)])
    assert g.prefix == (1, 2, 3) and [g.sequence(k) for k in range(3)] == seqs
    assert g.tokens == 3 + 2 + 3 + 2
    assert g.unshared_tokens == (5 + 6) + (5 + 5) + (5 + 6)
    with pytest.raises(ValueError, match="does not name two"):
        Group.from_sequences(seqs, [(0, 3, 0.0)])
    with pytest.raises(ValueError, match="does not name two"):
        Group.from_sequences(seqs, [(1, 1, 0.0)])


def test_split_keeps_every_pair_whole_within_the_limit_with_the_prefix_repeated():
    prefix = list(range(100, 110))
    seqs = [prefix + [k] * (3 + k) + [9] for k in range(6)]
    pairs = [(i, j, float(i + j)) for i in range(6) for j in range(6) if i < j]
    g = Group.from_sequences(seqs, pairs)
    assert g.split(g.tokens) == [g]
    parts = g.split(30)
    assert len(parts) > 1 and all(p.tokens <= 30 and p.prefix == g.prefix for p in parts)
    # the same pairs of the same sequences, in order, nothing dropped
    got = [(tuple(p.sequence(i)), tuple(p.sequence(j)), m) for p in parts for i, j, m in p.pairs]
    assert got == [(tuple(seqs[i]), tuple(seqs[j]), m) for i, j, m in pairs]
    with pytest.raises(DataError, match="longer than max_packed_length=20"):
        g.split(20)


def test_pack_groups_lays_out_positions_members_scores_and_pairs():
    a = Group.from_sequences([[1, 2, 3, 9], [1, 2, 4, 5, 9]], [(1, 0, 0.5)])
    b = Group.from_sequences([[7, 8, 9], [7, 6, 9], [7, 5, 9]], [(0, 2, 0.0), (1, 2, 1.0)])
    row = pack_groups([a, b])
    assert row.input_ids.tolist() == [1, 2, 3, 9, 4, 5, 9, 7, 8, 9, 6, 9, 5, 9]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 1, 2, 1, 2]
    assert row.group_ids.tolist() == [0] * 7 + [1] * 7
    assert row.member_ids.tolist() == [0, 0, 1, 1, 2, 2, 2, 0, 1, 1, 2, 2, 3, 3]
    assert row.score_index.tolist() == [3, 6, 9, 11, 13]
    assert row.pairs.tolist() == [[1, 0], [2, 4], [3, 4]]
    assert row.margins.tolist() == [0.5, 0.0, 1.0]
    assert row.group_bounds().tolist() == [0, 7, 14]


def test_the_mask_hides_siblings_and_other_groups():
    _, row = random_row(0)
    mask = dense_mask(row.group_ids, row.member_ids)
    g, m = row.group_ids, row.member_ids
    for qi in range(len(g)):
        for ki in range(len(g)):
            expect = ki <= qi and g[ki] == g[qi] and (m[ki] == 0 or m[ki] == m[qi])
            assert bool(mask[qi, ki]) == bool(expect)
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4),
                         row.group_ids[:2], row.member_ids[:2], "magic")


def test_rows_by_length_fill_shortest_first_and_give_a_long_group_its_own_row():
    from polar_xtuner.encoding.shared_prefix import rows_by_length

    groups = [Group.from_sequences([[1] * n + [2], [1] * n + [3]], [(0, 1, 0.0)]) for n in (9, 2, 30, 4)]
    assert [g.tokens for g in groups] == [11, 4, 32, 6]
    assert rows_by_length(groups, 12) == [[1, 3], [0], [2]]
    assert rows_by_length(groups, 0) == [[1], [3], [0], [2]]
    assert rows_by_length([], 10) == []


