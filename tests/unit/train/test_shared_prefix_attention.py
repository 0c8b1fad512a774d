"""polar_xtuner/train/shared_prefix_attention.py: every backend equals each candidate scored alone; the block mask is built blockwise."""
import pytest
import torch

from polar_xtuner.encoding.shared_prefix import dense_mask
from polar_xtuner.train.shared_prefix_attention import prefix_attention
from samples import random_row


@pytest.mark.parametrize("backend", ["sdpa", "flex", "dense"])
@pytest.mark.parametrize("seed", range(3))
def test_attention_equals_each_candidate_alone_with_gqa(backend, seed):
    """Every candidate's outputs (and its prefix's) equal causal attention over its whole sequence alone."""
    groups, row = random_row(seed)
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
