"""Packed (varlen) attention through xtuner's own contract, without flash-attn."""
import pytest
import torch

from polar_xtuner.train.attention import available_backends, select_backend
from polar_xtuner.demo.data import generate
from polar_xtuner.encoding import PolarEncoder

from common import build_reward_model as build_model
from common import publish_varlen_args as publish
from polar_xtuner.train.layout import WHOLE, MissingLayoutError, Packed, row_layout


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

