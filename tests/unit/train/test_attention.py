"""polar_xtuner/train/attention.py: packed (varlen) attention through xtuner's own contract without flash-attn, each backend's choice and refusals, and the torch_varlen call against each PyTorch release's real signature."""
from __future__ import annotations

import math

import pytest
import torch

from common import build_reward_model as build_model
from common import publish_varlen_args as publish
from polar_xtuner.demo.data import generate
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.train.attention import VarlenSignature, torch_varlen_call, varlen_signature
from polar_xtuner.train.attention import available_backends, select_backend
from polar_xtuner.train.layout import WHOLE, MissingLayoutError, Packed, row_layout


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


@pytest.fixture
def varlen_model(tiny_dir):
    model = build_model(tiny_dir)
    yield model
    publish(None, None)


def _pairs(tokenizer, n, seed=0):
    recs = list(generate(n, seed))
    # stretch some answers so the samples have clearly different lengths
    for i, r in enumerate(recs):
        r["chosen"] = [{"role": "assistant", "content": r["chosen"][0]["content"] + " Indeed." * i}]
    return PolarEncoder(tokenizer, 512, 128).encode_pairs(recs)


def _score_alone(model, ids):
    with torch.no_grad(), row_layout(WHOLE):
        h = model.llm(input_ids=torch.tensor([ids]))[0]
        return model.v_head(h)[0, -1, 0].item()


@pytest.mark.parametrize("n_pairs", [1, 2, 3, 5])
def test_packed_scores_equal_each_sample_alone(varlen_model, tokenizer, n_pairs):
    seqs = [s for p in _pairs(tokenizer, n_pairs) for s in (p["chosen_ids"], p["rejected_ids"])]
    assert len({len(s) for s in seqs}) > 1 or n_pairs == 1
    publish(None)
    alone = [_score_alone(varlen_model, s) for s in seqs]

    ids = torch.tensor([[t for s in seqs for t in s]])
    pos = torch.tensor([[i for s in seqs for i in range(len(s))]])  # restart per sample
    cu = torch.tensor([0] + list(torch.tensor([len(s) for s in seqs]).cumsum(0)), dtype=torch.int32)
    with torch.no_grad(), row_layout(Packed.of(cu, max(len(s) for s in seqs), "cpu")):
        values = varlen_model.v_head(varlen_model.llm(input_ids=ids, position_ids=pos)[0])[0, :, 0]
    packed = [values[int(e) - 1].item() for e in cu[1:]]
    assert packed == pytest.approx(alone, abs=1e-5)

    if n_pairs > 1:  # the same row laid out whole leaks: the test can tell
        with torch.no_grad(), row_layout(WHOLE):
            leaky = varlen_model.v_head(varlen_model.llm(input_ids=ids, position_ids=pos)[0])[0, :, 0]
        assert leaky[int(cu[-1]) - 1].item() != pytest.approx(alone[-1], abs=1e-3)
    with pytest.raises(MissingLayoutError):  # and without any layout it is refused, never laid out whole
        varlen_model.llm(input_ids=ids, position_ids=pos)


def test_packed_loss_and_gradients_equal_unpacked(varlen_model, tokenizer):
    from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
    from xtuner.dataset.preference_dataset import PackedDatasetWrapper

    pairs = _pairs(tokenizer, 4, seed=3)
    packed_row = PackedDatasetWrapper(pairs, max_packed_length=4096, shuffle_before_pack=False)
    assert len(packed_row) == 1
    packed = preference_collate_fn([packed_row[0]], use_varlen_attn=True)["data"]
    padded = preference_collate_fn(pairs, use_varlen_attn=False)["data"]
    model = varlen_model.train()

    def loss_and_grads(data, cu=None, max_seqlen=None):
        model.zero_grad()
        publish(cu, max_seqlen)
        out = model(dict(data), mode="loss")
        out["loss"].backward()
        return out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    cu = packed.pop("cumulative_len")[0]
    max_seqlen = packed.pop("max_seqlen")
    loss_p, grads_p = loss_and_grads(packed, cu, max_seqlen)
    loss_u, grads_u = loss_and_grads(padded)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) > 10
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("row", ["packed", "shared_prefix"])
def test_rotary_cos_sin_are_computed_once_per_row(varlen_model, tokenizer, monkeypatch, row):
    """One rotary embedding per row, not one per layer and recompute: every layer's is the same."""
    from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
    from xtuner.dataset.preference_dataset import PackedDatasetWrapper

    from common import loss_and_grads, prompt_groups, shared_row_batch

    calls = []
    rotary = type(varlen_model.llm.layers[0].attention.rotary_emb)
    original = rotary.forward
    monkeypatch.setattr(rotary, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    model = varlen_model.train()  # every layer recomputed in backward, as the GPU recipes run
    if row == "packed":
        pairs = _pairs(tokenizer, 4, seed=3)
        data = preference_collate_fn([PackedDatasetWrapper(pairs, max_packed_length=4096,
                                                           shuffle_before_pack=False)[0]], use_varlen_attn=True)["data"]
        loss_and_grads(model, data, data.pop("cumulative_len")[0], data.pop("max_seqlen"))
    else:
        loss_and_grads(model, shared_row_batch(prompt_groups(tokenizer)))
    assert len(model.llm.layers) > 1 and len(calls) == 1


def test_backend_choice_and_refusals(tiny_dir, capsys):
    assert select_backend() == available_backends()[0]
    if not torch.cuda.is_available():
        assert available_backends() == ["sdpa"]
        with pytest.raises(ValueError, match="install flash-attn"):
            select_backend("flash_attn")
        with pytest.raises(SystemExit) as e:  # built by the training loop: one line, exit 2
            build_model(tiny_dir, varlen_attn_backend="torch_varlen")
        assert e.value.code == 2 and "PyTorch >= 2.10" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be one of"):
        select_backend("magic")
    model = build_model(tiny_dir)
    assert model.varlen_attn_backend == available_backends()[0]


@pytest.mark.parametrize("sp, varlen, message", [
    (2, False, "needs use_varlen_attn = True"),
    (3, True, "sequence_parallel_size = 3 must divide the model's 8 attention heads"),
    (2, True, "runs on GPUs only"),
])
def test_sequence_parallel_refusals(tiny_dir, monkeypatch, capsys, sp, varlen, message):
    import xtuner.parallel.sequence as seq

    monkeypatch.setattr(seq, "get_sequence_parallel_world_size", lambda: sp)
    if message == "runs on GPUs only" and torch.cuda.is_available():
        # decided by the device found: with CUDA, sequence parallel is allowed and the model builds
        assert build_model(tiny_dir, use_varlen_attn=varlen).varlen_attn_backend == available_backends()[0]
        return
    with pytest.raises(SystemExit) as e:
        build_model(tiny_dir, use_varlen_attn=varlen)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _patched_attention(model):
    """Which InternLM2 attention modules carry an instance-level forward (the varlen patch)."""
    attention = [m for m in model.llm.modules() if hasattr(m, "wqkv")]
    assert attention
    return ["forward" in vars(m) for m in attention]


def test_padded_model_is_untouched(tiny_dir, tokenizer, tiny_model):
    model = build_model(tiny_dir, use_varlen_attn=False)
    assert model.varlen_attn_backend is None and model.use_varlen_attn is False
    assert not any(_patched_attention(model))
    assert all(_patched_attention(build_model(tiny_dir)))  # the check can tell: the varlen build patches
    # its score is the plain HF reward model's, read at the reward token
    ids = _pairs(tokenizer, 1)[0]["chosen_ids"]
    with torch.no_grad():
        t = torch.tensor([ids])
        reference = tiny_model(input_ids=t, attention_mask=torch.ones_like(t))[0].item()
    assert _score_alone(model, ids) == pytest.approx(reference, abs=1e-5)
