"""Attention over a shared-prefix row (:mod:`polar_xtuner.encoding.shared_prefix`), three backends.

* ``flex``: FlexAttention with a block mask built from group and member ids
  (``torch.nn.attention.flex_attention``; CPU and CUDA; compiled, or eager,
  which is exact but slow);
* ``sdpa``: one SDPA call over gathered segments, each candidate's queries
  against its prefix's keys and its own (the varlen idea with separate query
  and key lengths): cost sum(candidate x (prefix + candidate)), on any device;
* ``dense``: SDPA with the row's whole (T, T) mask, the plain reference the
  tests compare against.

:mod:`polar_xtuner.train.attention` dispatches here from the patched InternLM2
attention; :mod:`polar_xtuner.train.layout` builds each backend's mask once a row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from polar_xtuner.encoding.shared_prefix import allowed, dense_mask
from polar_xtuner.errors import ConfigError

BACKENDS = ("flex", "sdpa", "dense")


# Query rows per chunk when classifying a row's blocks: a chunk's mask is CHUNK x T bools
# (32 MiB at T = 32768), never the row's T x T (1 GiB).
BLOCK_MASK_CHUNK = 1024


def block_mask(group_ids: torch.Tensor, member_ids: torch.Tensor, block_size: int = 128,
               chunk: int = BLOCK_MASK_CHUNK):
    """FlexAttention's block mask of a row, built blockwise (once per row, shared by every layer).

    ``create_block_mask`` evaluates the mask over the whole (T, T) grid (1 GiB
    at a 32768-token row) unless compiled. Here each chunk of query blocks is
    classified against every key block (empty, full or partial), so memory is
    ``chunk x T``; the result is the block mask ``create_block_mask`` gives.
    """
    from torch.nn.attention.flex_attention import BlockMask

    t, device = len(group_ids), group_ids.device
    nb = -(-t // block_size)
    padded = nb * block_size
    chunk = max(block_size, chunk // block_size * block_size)
    kv = torch.arange(padded, device=device)
    kv_in = kv < t
    kv_c = kv.clamp(max=t - 1)
    full_blocks, partial_blocks = [], []
    for start in range(0, padded, chunk):
        q = torch.arange(start, min(start + chunk, padded), device=device)
        q_in = q < t
        ok = allowed(group_ids, member_ids, q.clamp(max=t - 1)[:, None], kv_c[None, :])
        ok &= q_in[:, None] & kv_in[None, :]
        counts = ok.view(len(q) // block_size, block_size, nb, block_size).sum(dim=(1, 3))
        full_blocks.append(counts == block_size * block_size)
        partial_blocks.append((counts > 0) & (counts < block_size * block_size))
    full, partial = torch.cat(full_blocks), torch.cat(partial_blocks)

    def ordered(blocks):  # (nb, nb) bool -> counts and indices, present blocks first in order
        blocks = blocks.to(torch.int32)
        idx = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
        return blocks.sum(-1).to(torch.int32)[None, None], idx[None, None].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(group_ids, member_ids, q_idx, kv_idx)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(t, t))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # shapes turn dynamic on the first recompile (row lengths vary)


@dataclass
class Segments:
    """Segments of a row for the ``sdpa`` backend, padded to one shape: their queries, keys and mask.

    A prefix sees itself causally; a candidate sees its group's whole prefix,
    then itself causally.
    """

    q_index: torch.Tensor  # (S, Lq) row positions of each segment's queries (clamped where padded)
    k_index: torch.Tensor  # (S, Lk) row positions of its keys: its prefix's, then its own
    mask: torch.Tensor  # (S, Lq, Lk) bool
    q_valid: torch.Tensor  # (S, Lq) bool: a real query, not padding


def _segment_batch(starts, lengths, pre_start, pre_len, t: int) -> Segments:
    device = starts.device
    i = torch.arange(int(lengths.max()), device=device)
    j = torch.arange(int((pre_len + lengths).max()), device=device)
    q_valid = i[None, :] < lengths[:, None]
    q_index = (starts[:, None] + i[None, :]).clamp(max=t - 1)
    own = j[None, :] - pre_len[:, None]  # a key's offset in the segment itself (< 0: in the prefix)
    k_index = torch.where(own < 0, pre_start[:, None] + j[None, :], starts[:, None] + own).clamp(0, t - 1)
    k_valid = own < lengths[:, None]
    # a real query sees the prefix and its own earlier tokens; a padded one every real key (no empty rows)
    sees = (own[:, None, :] < 0) | (own[:, None, :] <= i[None, :, None])
    mask = k_valid[:, None, :] & (sees | ~q_valid[:, :, None])
    return Segments(q_index, k_index, mask, q_valid)


def segments(group_ids: torch.Tensor, member_ids: torch.Tensor) -> list[Segments]:
    """The row's prefixes and its candidates as two :class:`Segments` batches (built once per row).

    Two batches, so a short candidate is not padded to a long prefix's length.
    """
    t = len(group_ids)
    device = group_ids.device
    change = torch.ones(t, dtype=torch.bool, device=device)
    change[1:] = (group_ids[1:] != group_ids[:-1]) | (member_ids[1:] != member_ids[:-1])
    starts = torch.nonzero(change).flatten()
    lengths = torch.diff(torch.cat([starts, torch.tensor([t], device=device)]))
    is_prefix = member_ids[starts] == 0
    # each candidate's prefix: the latest prefix segment before it, when it is of the same group
    last = torch.cummax(torch.where(is_prefix, torch.arange(len(starts), device=device), -1), 0).values.clamp(min=0)
    has_pre = (~is_prefix) & is_prefix[last] & (group_ids[starts[last]] == group_ids[starts])
    pre_start = torch.where(has_pre, starts[last], 0)
    pre_len = torch.where(has_pre, lengths[last], 0)
    return [_segment_batch(starts[sel], lengths[sel], pre_start[sel], pre_len[sel], t)
            for sel in (is_prefix, ~is_prefix) if bool(sel.any())]


def _segment_sdpa(q, k, v, batches: list[Segments]):
    """Attention of a (1, H, T, D) row over its segment batches, one SDPA call each."""
    gqa = k.shape[1] != q.shape[1]
    q0, k0, v0 = (x[0].transpose(0, 1) for x in (q, k, v))  # (T, H, D)
    positions, values = [], []
    for seg in batches:
        out = torch.nn.functional.scaled_dot_product_attention(
            q0[seg.q_index].transpose(1, 2), k0[seg.k_index].transpose(1, 2), v0[seg.k_index].transpose(1, 2),
            attn_mask=seg.mask[:, None], enable_gqa=gqa)  # (S, H, Lq, D)
        positions.append(seg.q_index[seg.q_valid])
        values.append(out.transpose(1, 2)[seg.q_valid])  # (n, H, D)
    rows = q0.new_zeros(q0.shape).index_put((torch.cat(positions),), torch.cat(values))
    return rows.transpose(0, 1)[None]


def prefix_attention(q, k, v, group_ids, member_ids, backend: str = "flex", mask=None, compiled: bool = True):
    """Attention over one shared-prefix row.

    Args:
        q: (1, Hq, T, D) queries.
        k, v: (1, Hkv, T, D) keys and values (Hq a multiple of Hkv: GQA).
        group_ids, member_ids: (T,) the row's layout (:class:`SharedPrefixRow`).
        backend: One of :data:`BACKENDS`.
        mask: The row's prebuilt mask (:func:`block_mask` for flex,
            :func:`segments` for sdpa, :func:`dense_mask` for dense); built
            here when None.
        compiled: Run FlexAttention compiled (fast); eager is exact but slow.

    Returns:
        (1, Hq, T, D).
    """
    gqa = k.shape[1] != q.shape[1]
    if backend == "sdpa":
        return _segment_sdpa(q, k, v, segments(group_ids, member_ids) if mask is None else mask)
    if backend == "dense":
        mask = dense_mask(group_ids, member_ids) if mask is None else mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if backend != "flex":
        raise ConfigError(f"shared-prefix attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    from torch.nn.attention.flex_attention import flex_attention

    mask = block_mask(group_ids, member_ids) if mask is None else mask
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=mask, enable_gqa=gqa)
