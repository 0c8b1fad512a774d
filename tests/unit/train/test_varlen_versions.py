"""The torch_varlen backend's call, built against each PyTorch release's real signature.

``torch.nn.attention.varlen.varlen_attn`` changed from release to release, and
the kernel runs on CUDA only. So each fake here has the exact parameter list of
one release (copied from that release's ``torch/nn/attention/varlen.py``) and
computes what that release's kernel computes with the arguments it was given:
the default window ``(-1, -1)`` is bidirectional, and a release without
``enable_gqa`` needs as many key/value heads as query heads. The output must
equal each sample's causal attention computed alone, for every release.
"""
from __future__ import annotations

import math

import pytest
import torch

from polar_xtuner.train.attention import VarlenSignature, torch_varlen_call, varlen_signature


def _kernel(q, k, v, cu_q, max_q, causal: bool, gqa: bool):
    """What the flash kernel computes: attention within each sample, dense and in fp64."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        if not gqa:  # the real kernel fails (or reads the wrong heads) without GQA support
            raise RuntimeError(f"number of heads in key/value must equal query: {hkv} != {hq}")
        k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).double() for x in (q, k, v))  # (H, L, D)
        att = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            att = att.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = (att.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


# Each release's public parameters, exactly; the bodies interpret them as that release does.
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _kernel(query, key, value, cu_seq_q, max_q, causal=is_causal, gqa=False)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    return _kernel(query, key, value, cu_seq_q, max_q, causal=tuple(window_size) == (-1, 0), gqa=False)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return _kernel(query, key, value, cu_seq_q, max_q, causal=tuple(window_size) == (-1, 0), gqa=enable_gqa)


# 2.13 and 2.14 kept 2.12's parameters (2.13 added varlen_attn_out beside it).
varlen_attn_2_13 = varlen_attn_2_14 = varlen_attn_2_12

RELEASES = {
    "2.10": (varlen_attn_2_10, VarlenSignature(causal="is_causal", gqa=False)),
    "2.11": (varlen_attn_2_11, VarlenSignature(causal="window_size", gqa=False)),
    "2.12": (varlen_attn_2_12, VarlenSignature(causal="window_size", gqa=True)),
    "2.13": (varlen_attn_2_13, VarlenSignature(causal="window_size", gqa=True)),
    "2.14": (varlen_attn_2_14, VarlenSignature(causal="window_size", gqa=True)),
}


def _reference(q, k, v, cu):
    """Each sample alone through PyTorch SDPA (causal, GQA), in fp64."""
    groups = q.shape[1] // k.shape[1]
    out = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None].double() for x in (q, k, v))
        ks, vs = (x.repeat_interleave(groups, dim=1) for x in (ks, vs))
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("release", sorted(RELEASES))
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (8, 8)], ids=["1.8B-GQA", "7B-GQA", "MHA"])
def test_call_matches_each_sample_alone_on_every_release(release, heads):
    fn, expected = RELEASES[release]
    sig = varlen_signature(fn)
    assert sig == expected
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hash((release, heads)) % 2**31)
    lengths = [7, 1, 12, 5]
    t = sum(lengths)
    q = torch.randn(t, hq, 16, generator=gen)
    k, v = (torch.randn(t, hkv, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = torch_varlen_call(fn, sig, q, k, v, cu, max(lengths))
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _reference(q, k, v, cu), rtol=1e-5, atol=1e-5)


def test_a_release_without_a_causal_argument_is_not_offered():
    def varlen_attn_future(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, mask_mod=None):
        raise AssertionError("never called")

    assert varlen_signature(varlen_attn_future) is None


def test_installed_signature_is_one_of_the_known_ones():
    """The PyTorch under test has one of the signatures above (or no varlen_attn at all)."""
    pytest.importorskip("torch.nn.attention.varlen")
    from torch.nn.attention.varlen import varlen_attn

    assert varlen_signature(varlen_attn) in {sig for _, sig in RELEASES.values()}
