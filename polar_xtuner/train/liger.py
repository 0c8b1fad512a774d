"""Liger Kernel's fused Triton kernels inside POLAR's InternLM2: RMSNorm, SwiGLU and rotary, on CUDA.

Liger ships patches for models transformers knows; InternLM2 is remote code
(``modeling_internlm2.py`` beside the weights), so there is none for it. This
module swaps the forwards of those modules in place, as
:mod:`polar_xtuner.train.attention` swaps attention's:

* every ``InternLM2RMSNorm``: ``liger_rms_norm`` with Llama's casting (the
  inverse RMS in fp32, the product cast back before the weight), which is
  InternLM2's own order;
* every ``InternLM2MLP``: ``w2(liger_swiglu(w1 x, w3 x))``, the fused
  ``silu(a) * b``;
* the module's ``apply_rotary_pos_emb``: ``liger_rope``, which both the
  model's own attention and the varlen and shared-prefix forwards call.

A config turns it on with ``use_liger_kernel = True`` (the GPU recipes). The
kernels are Triton on CUDA, so on a machine without CUDA nothing is patched and
the log says so: the same config trains on CPU with the eager modules. Asked
for on CUDA without the package installed, the run stops with one line.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch

from polar_xtuner.errors import ConfigError

LIGER_MISSING = ("use_liger_kernel = True needs Liger Kernel on this CUDA machine: pip install liger-kernel "
                 "(`make gpu-wheels` carries it), or set use_liger_kernel = False in the config")


@dataclass(frozen=True)
class LigerFunctions:
    """The three fused functions, as ``liger_kernel.transformers.functional`` names them."""

    rms_norm: object  # (X, W, eps, offset, casting_mode, in_place) -> Y
    swiglu: object  # (a, b) -> silu(a) * b
    rope: object  # (q, k, cos, sin, position_ids=None, unsqueeze_dim=1) -> (q, k)


def liger_functions() -> LigerFunctions:
    """Liger's functions, or :class:`ConfigError` naming the package when it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_rms_norm, liger_rope, liger_swiglu
    except ImportError as e:
        raise ConfigError(f"{LIGER_MISSING} ({e})") from None
    return LigerFunctions(liger_rms_norm, liger_swiglu, liger_rope)


def _is_rms_norm(module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_swiglu_mlp(module) -> bool:
    return all(hasattr(module, w) for w in ("w1", "w2", "w3", "act_fn"))


def patch_model(model, fns: LigerFunctions) -> dict:
    """Swap the InternLM2 modules of ``model`` for ``fns``; returns how many of each were swapped.

    Raises:
        ConfigError: The model is not InternLM2-shaped (no RMSNorm or MLP found),
            or its MLP's activation is not SiLU (Liger's SwiGLU computes SiLU).
    """
    act = getattr(getattr(model, "config", None), "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"use_liger_kernel: Liger's SwiGLU computes silu(w1 x) * w3 x, but the model's "
                          f"hidden_act is {act!r}; set use_liger_kernel = False")
    norms = mlps = 0
    code_modules = set()
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward(fns.rms_norm), module)
            norms += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_swiglu_forward(fns.swiglu), module)
            mlps += 1
        code = sys.modules.get(type(module).__module__)
        if code is not None and hasattr(code, "apply_rotary_pos_emb") and type(module).__name__.startswith("InternLM2"):
            code_modules.add(code)
    if not norms or not mlps:
        raise ConfigError(f"use_liger_kernel: no InternLM2 RMSNorm or MLP module found in "
                          f"{type(model).__name__}; set use_liger_kernel = False")
    # The model's own code module (one per model directory): its attention, and the varlen and
    # shared-prefix forwards of polar_xtuner.train.attention, look the function up there at each call.
    for code in code_modules:
        code.apply_rotary_pos_emb = fns.rope
    return {"rms_norm": norms, "swiglu": mlps, "rope_modules": len(code_modules)}


def _rms_norm_forward(rms_norm):
    def forward(self, hidden_states):
        # "llama" casting is InternLM2's: fp32 inverse RMS, the product cast back, then the weight
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True)

    return forward


def _swiglu_forward(swiglu):
    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))

    return forward


def apply_liger_kernel(model, enabled: bool, cuda: bool | None = None) -> str:
    """Apply :func:`patch_model` where it can run; returns the line to log.

    Args:
        model: The InternLM2 model (``PolarRewardModel.llm``).
        enabled: The config's ``use_liger_kernel``.
        cuda: Whether training runs on CUDA (``torch.cuda.is_available()`` when None).

    Raises:
        ConfigError: Enabled on CUDA and Liger is not installed, or the model
            does not fit (see :func:`patch_model`).
    """
    if not isinstance(enabled, bool):
        raise ConfigError(f"use_liger_kernel must be True or False, got {enabled!r}")
    if not enabled:
        return "Liger kernel: off (use_liger_kernel = False)"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "Liger kernel: skipped, no CUDA here (its kernels are Triton on CUDA); eager RMSNorm, SwiGLU, rotary"
    counts = patch_model(model, liger_functions())
    return (f"Liger kernel: fused RMSNorm x{counts['rms_norm']}, SwiGLU x{counts['swiglu']}, "
            f"rotary in {counts['rope_modules']} model code module(s)")
