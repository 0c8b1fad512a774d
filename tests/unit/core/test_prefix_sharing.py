"""Shared-prefix rows (polar_xtuner/encoding/shared_prefix.py): layout, splitting, and attention equal to each sequence alone."""
import pytest
import torch

from polar_xtuner.encoding.shared_prefix import Group, dense_mask, pack_groups, split_prefix
from polar_xtuner.train.shared_prefix_attention import prefix_attention
from polar_xtuner.records import DataError


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


def _random_row(seed):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(3):
        prefix = torch.randint(0, 50, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        seqs = [prefix + torch.randint(50, 99, (int(torch.randint(1, 9, (1,), generator=g)),),
                                       generator=g).tolist() for _ in range(int(torch.randint(2, 5, (1,), generator=g)))]
        groups.append(Group.from_sequences(seqs, [(0, 1, 0.0)]))
    return groups, pack_groups(groups)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "dense"])
@pytest.mark.parametrize("seed", range(3))
def test_attention_equals_each_candidate_alone_with_gqa(backend, seed):
    """Every candidate's outputs (and its prefix's) equal causal attention over its whole sequence alone."""
    groups, row = _random_row(seed)
    t, hq, hkv, d = len(row.input_ids), 8, 4, 16
    g = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(1, h, t, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    # eager FlexAttention: exact; compiled it is the fast path (checked against this in bench and on GPU)
    out = prefix_attention(q, k, v, row.group_ids, row.member_ids, backend, compiled=False)
    for gi in range(len(groups)):
        in_group = (row.group_ids == gi).nonzero().flatten()
        members = row.member_ids[in_group]
        for m in range(1, int(members.max()) + 1):
            idx = in_group[(members == 0) | (members == m)]  # the whole sequence: prefix then candidate
            alone = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, idx], k[:, :, idx], v[:, :, idx], is_causal=True, enable_gqa=True)
            assert torch.allclose(out[:, :, idx], alone, atol=1e-12), (gi, m)


def test_the_mask_hides_siblings_and_other_groups():
    _, row = _random_row(0)
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


def _layout(parts):
    gid, mid = [], []
    for g, (prefix, candidates) in enumerate(parts):
        gid += [g] * prefix
        mid += [0] * prefix
        for k, n in enumerate(candidates, start=1):
            gid += [g] * n
            mid += [k] * n
    return torch.tensor(gid, dtype=torch.int32), torch.tensor(mid, dtype=torch.int32)


@pytest.mark.parametrize("parts, chunk", [
    ([(150, [40, 90, 300]), (33, [7, 260]), (400, [129, 128, 1])], 256),  # 1688 tokens: a part block at the end
    ([(128, [128, 128]), (256, [128])], 128),  # every edge on a block edge
    ([(5, [3])], 1024),  # one block, mostly padding
])
def test_block_mask_is_built_blockwise_and_equals_torchs(parts, chunk, monkeypatch):
    """The same BlockMask as create_block_mask, without ever holding the row's (T, T) mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    import polar_xtuner.train.shared_prefix_attention as ps

    gid, mid = _layout(parts)
    t = len(gid)
    want = create_block_mask(lambda b, h, q, k: ps.allowed(gid, mid, q, k), None, None, t, t, device="cpu")
    largest = []
    real = ps.allowed

    def spy(g, m, q, k):
        out = real(g, m, q, k)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(ps, "allowed", spy)
    got = ps.block_mask(gid, mid, chunk=chunk)
    monkeypatch.undo()
    padded = -(-t // 128) * 128
    assert max(largest) <= max(chunk, 128) * padded < t * t or t <= 128
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    q, k, v = torch.randn(1, 4, t, 32, dtype=torch.float64), *torch.randn(2, 1, 2, t, 32, dtype=torch.float64)
    out = prefix_attention(q, k, v, gid, mid, "flex", mask=got, compiled=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(gid, mid), enable_gqa=True)
    assert (out - ref).abs().max().item() < 1e-10
