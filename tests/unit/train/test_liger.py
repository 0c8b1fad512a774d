"""polar_xtuner/train/liger.py: Liger Kernel's fused RMSNorm, SwiGLU and rotary inside InternLM2.

On CPU: the setting is skipped as documented, a missing package is one line,
and the swap itself is checked with eager stand-ins for Liger's three
functions (the same arithmetic): every RMSNorm and MLP goes through them, the
rotary of every attention call too, and the shipped recipe's loss and
gradients on a shared-prefix row are unchanged. On CUDA (``gpu``): Liger's
kernels against the eager modules, fp32 and bf16.
"""
import glob
import os
import sys

import pytest
import torch
from mmengine.config import Config

from common import REPO, build_reward_model, loss_and_grads, prompt_groups, shared_row_batch
from polar_xtuner.errors import ConfigError
from polar_xtuner.train.liger import LIGER_MISSING, LigerFunctions, apply_liger_kernel, patch_model


def _eager_stand_ins(calls):
    """Liger's three functions as eager PyTorch, counting their calls."""

    def rms_norm(x, w, eps, offset, casting_mode, in_place):
        calls["rms_norm"] += 1
        assert (offset, casting_mode) == (0.0, "llama")
        x32 = x.to(torch.float32)
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def swiglu(a, b):
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a) * b

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate_half(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    return LigerFunctions(rms_norm, swiglu, rope)


@pytest.fixture
def code_module_kept(tiny_dir, monkeypatch):
    """The model code module's apply_rotary_pos_emb, put back after the test (patching sets it)."""
    model = build_reward_model(tiny_dir)
    code = sys.modules[type(model.llm.layers[0].attention).__module__]
    monkeypatch.setattr(code, "apply_rotary_pos_emb", code.apply_rotary_pos_emb)
    return model


def test_the_swap_reaches_every_module_and_leaves_the_shipped_recipes_gradients(tiny_dir, tokenizer,
                                                                                 code_module_kept):
    """The 1.8B/7B recipe's model (varlen, shared prefixes, every layer recomputed) with the stand-ins."""
    data = shared_row_batch(prompt_groups(tokenizer))
    base = code_module_kept.train()
    out_eager, grads_eager = loss_and_grads(base, data)
    patched = build_reward_model(tiny_dir).train()
    calls = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    counts = patch_model(patched.llm, _eager_stand_ins(calls))
    layers = patched.llm.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope_modules": 1}
    out, grads = loss_and_grads(patched, data)
    # forward and the recompute in backward: every module twice per layer
    assert calls == {"rms_norm": 2 * (2 * layers) + 1, "swiglu": 2 * layers, "rope": 2 * layers}, calls
    assert torch.equal(out["loss"], out_eager["loss"])
    assert grads.keys() == grads_eager.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads_eager[name]), name


def test_without_cuda_the_setting_is_skipped_and_the_eager_modules_run(tiny_dir):
    model = build_reward_model(tiny_dir)
    norm, mlp = model.llm.layers[0].attention_norm, model.llm.layers[0].feed_forward
    line = apply_liger_kernel(model.llm, True, cuda=False)
    assert line.startswith("Liger kernel: skipped, no CUDA here") and "forward" not in vars(norm)
    assert apply_liger_kernel(model.llm, False) == "Liger kernel: off (use_liger_kernel = False)"
    if not torch.cuda.is_available():  # the model as a GPU config builds it, here: the same eager modules
        model = build_reward_model(tiny_dir, use_liger_kernel=True)
        norm, mlp = model.llm.layers[0].attention_norm, model.llm.layers[0].feed_forward
    assert "forward" not in vars(norm) and "forward" not in vars(mlp)


def test_asked_for_on_cuda_without_the_package_is_one_line(tiny_dir, monkeypatch):
    model = build_reward_model(tiny_dir)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    with pytest.raises(ConfigError) as e:
        apply_liger_kernel(model.llm, True, cuda=True)
    assert str(e.value).startswith(LIGER_MISSING) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="must be True or False, got 'yes'"):
        apply_liger_kernel(model.llm, "yes", cuda=True)


def test_every_config_sets_it_and_hands_it_to_the_model():
    """The GPU recipes turn it on, the CPU demos off; the model gets the config's variable."""
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        cfg = Config.fromfile(path)
        assert cfg.use_liger_kernel is ("tiny" not in os.path.basename(path)), path
        assert cfg.model.use_liger_kernel is cfg.use_liger_kernel, path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_liger_kernels_match_the_eager_modules_on_cuda(tiny_dir, tokenizer, code_module_kept, dtype, tol):
    """Liger's Triton kernels against the eager modules: the shipped recipe's loss and gradients on a shared row."""
    pytest.importorskip("liger_kernel", reason="make gpu-wheels carries liger-kernel to the GPU machine")
    data = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in shared_row_batch(prompt_groups(tokenizer)).items()}
    data["shared_prefix"] = data["shared_prefix"].to("cuda")
    # Segment SDPA for shared-prefix attention, not the shipped compiled FlexAttention: what is
    # compared is Liger's kernels, and two compiles per dtype would spend the GPU check's pytest
    # budget (the recipe_gradients step runs the shipped attention on the GPU).
    base = build_reward_model(tiny_dir, shared_prefix_attn_backend="sdpa").to("cuda", dtype).train()
    out_eager, grads_eager = loss_and_grads(base, data)
    fused = build_reward_model(tiny_dir, use_liger_kernel=True, shared_prefix_attn_backend="sdpa")
    fused = fused.to("cuda", dtype).train()
    assert "forward" in vars(fused.llm.layers[0].attention_norm)  # patched at build: CUDA is here
    out, grads = loss_and_grads(fused, data)
    assert abs(float(out["loss"]) - float(out_eager["loss"])) <= tol * max(1.0, abs(float(out_eager["loss"])))
    for name, g in grads.items():
        ref = grads_eager[name].float()
        assert torch.linalg.vector_norm(g.float() - ref) <= tol * max(torch.linalg.vector_norm(ref), 1e-6), name
