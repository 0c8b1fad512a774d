"""Varlen (packed) attention for InternLM2 that is correct without flash-attn.

With ``use_varlen_attn=True`` xtuner packs several chosen/rejected sequences
into one row and publishes the sample boundaries through mmengine's
``MessageHub.get_instance("varlen_attn_args")`` under
``cumulative_len_rank_{rank}`` and ``max_seqlen_rank_{rank}``. Attention must
then stay inside each sample. xtuner 0.2.0 only does this through flash-attn
and silently skips it otherwise, so samples attend to the ones packed before
them. This module installs an attention forward that honours the boundaries
with one of three backends:

* ``flash_attn``: ``flash_attn_varlen_func`` (GPU, flash-attn installed);
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, PyTorch
  2.10+, no flash-attn build needed). Its signature changed between releases
  (2.10: ``is_causal``, no GQA; 2.11: a causal ``window_size``, no GQA;
  2.12+: both ``window_size`` and ``enable_gqa``), so the call is built from
  the installed function's signature (:func:`torch_varlen_call`), repeating
  the key/value heads where the kernel has no GQA;
* ``sdpa``: PyTorch SDPA over the samples laid out as padded rows, exact on
  any device (CPU, tests).

The backend is chosen automatically (in that order), logged once, and can be
forced with ``varlen_attn_backend`` in the model config. Under sequence
parallel each rank holds a slice of the row; xtuner's Ulysses all-to-all turns
that into whole samples for a share of the heads around the attention call,
and back.

The layout a forward uses (the bounds, or a shared-prefix row) is not read
from process-wide state: :mod:`polar_xtuner.train.layout` carries it with the
row, through activation-checkpoint recomputes too. A padded batch declares
:data:`~polar_xtuner.train.layout.WHOLE` and gets the module's original
forward; no layout at all is an error.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polar_xtuner.errors import ConfigError
from polar_xtuner.precision import backend_for, half_dtype
from polar_xtuner.train import shared_prefix_attention
from polar_xtuner.train.layout import WHOLE, SharedPrefix, require_layout

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")

FLEX_CPU_TRAINING = ("shared_prefix_attn_backend='flex' cannot train on CPU: FlexAttention has no CPU "
                     "backward in this PyTorch; use 'sdpa' (the CPU default)")


@dataclass(frozen=True)
class VarlenSignature:
    """What the installed ``varlen_attn`` accepts, read from its signature.

    Attributes:
        causal: How to ask for causal attention: ``"window_size"`` (a
            ``(-1, 0)`` window; the default ``(-1, -1)`` is bidirectional) or
            ``"is_causal"`` (PyTorch 2.10).
        gqa: It takes ``enable_gqa`` (fewer key/value heads than query heads).
    """

    causal: str
    gqa: bool


def varlen_signature(fn) -> VarlenSignature | None:
    """The capabilities of a ``varlen_attn`` function, or None if it cannot attend causally."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal = "window_size"
    elif "is_causal" in params:
        causal = "is_causal"
    else:
        return None
    return VarlenSignature(causal=causal, gqa="enable_gqa" in params)


@functools.lru_cache(maxsize=1)
def installed_varlen():
    """(varlen_attn, its signature) of this PyTorch, or (None, None)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    return varlen_attn, varlen_signature(varlen_attn)


def torch_varlen_call(fn, sig: VarlenSignature, q, k, v, cu_seqlens, max_seqlen: int):
    """Causal ``varlen_attn`` within packed samples, with the arguments ``fn`` accepts.

    Where the kernel has no GQA, each key/value head is repeated for the query
    heads that share it (InternLM2 groups query heads per key/value head, as
    ``repeat_interleave`` does).
    """
    hq, hkv = q.shape[1], k.shape[1]
    kwargs = {}
    if hq != hkv:
        if sig.gqa:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    if sig.causal == "window_size":
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _has_torch_varlen() -> bool:
    return installed_varlen()[1] is not None


def available_backends() -> list[str]:
    """Backends that can run on this machine, best first."""
    found = []
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attn")
    if torch.cuda.is_available() and _has_torch_varlen():
        found.append("torch_varlen")
    found.append("sdpa")
    return found


def select_backend(requested: str | None = None) -> str:
    """Pick a varlen backend, or refuse one that cannot run here.

    Raises:
        ConfigError: An unknown or unavailable backend was requested.
    """
    avail = available_backends()
    if requested is None:
        return avail[0]
    if requested not in BACKENDS:
        raise ConfigError(f"varlen_attn_backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested not in avail:
        how = {"flash_attn": "install flash-attn on a CUDA machine",
               "torch_varlen": f"use a CUDA machine with PyTorch >= 2.10 (this is {torch.__version__})"}[requested]
        raise ConfigError(
            f"varlen_attn_backend={requested!r} is not available here ({how}); "
            f"available: {', '.join(avail)}"
        )
    return requested


def sequence_parallel_size() -> int:
    """Ranks that share one packed row (xtuner's sequence parallel group)."""
    from xtuner.parallel.sequence import get_sequence_parallel_world_size

    return get_sequence_parallel_world_size()


def varlen_args():
    """(cumulative_len, max_seqlen) published by xtuner's hook for this rank, or (None, None)."""
    from mmengine import MessageHub
    from mmengine.dist import get_rank

    hub = MessageHub.get_instance("varlen_attn_args")
    rank = get_rank()
    return hub.get_info(f"cumulative_len_rank_{rank}"), hub.get_info(f"max_seqlen_rank_{rank}")


def shared_prefix_backend(requested: str | None, device: torch.device | str) -> str:
    """The shared-prefix attention backend: compiled FlexAttention on CUDA, segment SDPA on CPU.

    On CPU a compiled FlexAttention pays a compile per row length, and eager
    FlexAttention is slow; one SDPA call over gathered segments costs what the
    candidates attend to. ``requested`` forces one (:data:`shared_prefix_attention.BACKENDS`).
    """
    if requested is None:
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if requested not in shared_prefix_attention.BACKENDS:
        raise ConfigError(f"shared_prefix_attn_backend must be one of {', '.join(shared_prefix_attention.BACKENDS)} "
                          f"or None, got {requested!r}")
    return requested


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, backend: str):
    """Causal attention within each packed sample.

    Args:
        q: (T, Hq, D) queries of one packed row.
        k, v: (T, Hkv, D) keys and values (Hq a multiple of Hkv: GQA).
        cu_seqlens: (N+1,) int32 sample boundaries, starting at 0, ending at T.
        max_seqlen: Longest sample.
        backend: One of :data:`BACKENDS`.

    Returns:
        (T, Hq, D) attention output.
    """
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    if backend == "torch_varlen":
        fn, sig = installed_varlen()
        if sig is None:
            raise ConfigError(f"varlen_attn_backend='torch_varlen': PyTorch {torch.__version__} has no causal "
                              "varlen_attn; use varlen_attn_backend='sdpa' or PyTorch >= 2.10")
        return torch_varlen_call(fn, sig, q, k, v, cu_seqlens, max_seqlen)
    return _padded_sdpa(q, k, v, cu_seqlens)


def _padded_sdpa(q, k, v, cu_seqlens):
    """Exact varlen attention with one SDPA call: samples become padded rows.

    Each sample of the packed row is scattered into its own row of an
    (N, max_len) batch; a causal mask that also hides the padding keeps every
    query inside its sample. Cost is N x max_len^2, not (sum of lengths)^2.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n, max_len = len(lengths), int(lengths.max())
    sample = torch.repeat_interleave(torch.arange(n, device=q.device), lengths)
    offset = torch.arange(q.shape[0], device=q.device) - cu_seqlens[:-1].long()[sample]

    def to_rows(x):
        rows = x.new_zeros((n, max_len) + x.shape[1:])
        rows[sample, offset] = x
        return rows.transpose(1, 2)  # (N, H, L, D)

    pos = torch.arange(max_len, device=q.device)
    mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lengths[:, None, None])
    o = F.scaled_dot_product_attention(to_rows(q), to_rows(k), to_rows(v), attn_mask=mask[:, None],
                                       enable_gqa=k.shape[1] != q.shape[1])
    return o.transpose(1, 2)[sample, offset]


def _modeling_module(attn):
    return sys.modules[type(attn).__module__]


def make_internlm2_varlen_forward(original_forward, backend: str):
    """An InternLM2 attention forward that honours packed sample boundaries."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, **kwargs):
        layout = require_layout()  # carried with the row, recomputes included (polar_xtuner/train/layout.py)
        if layout is WHOLE:
            return original_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_value=past_key_value, output_attentions=output_attentions,
                                    use_cache=use_cache, cache_position=cache_position, **kwargs)
        bsz, q_len, _ = hidden_states.shape
        if bsz != 1:
            raise ValueError(f"varlen attention takes one packed row per step, got a batch of {bsz}")
        if isinstance(layout, SharedPrefix):
            return self.wo(_shared_prefix_forward(self, hidden_states, position_ids, layout)), None, past_key_value
        sp = sequence_parallel_size()
        if layout.tokens != q_len * sp:
            raise ValueError(f"cumulative_len ends at {layout.tokens} but the row has {q_len * sp} tokens")
        q, k, v = _rotary_qkv(self, hidden_states, position_ids, layout)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (1, T/sp, H, D)
        if sp > 1:
            # Ulysses: trade the sequence split for a head split, so every rank
            # sees whole samples (xtuner's all-to-all; it splits the rows).
            from xtuner.parallel.sequence import pre_process_for_sequence_parallel_attn

            q, k, v = pre_process_for_sequence_parallel_attn(q, k, v)
        q, k, v = (x[0] for x in (q, k, v))  # (T, H', D)
        use = backend_for(q, backend)  # where the tensors are, not what the machine has
        if q.dtype == torch.float32 and use != "sdpa":
            # flash kernels take half precision only (fp32 master weights under autocast)
            q, k, v = (x.to(half_dtype(q.device)) for x in (q, k, v))
        out = varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, use)
        out = out.to(hidden_states.dtype)[None]
        if sp > 1:
            from xtuner.parallel.sequence import post_process_for_sequence_parallel_attn

            out = post_process_for_sequence_parallel_attn(out)
        out = out.reshape(bsz, q_len, self.hidden_size)
        return self.wo(out), None, past_key_value

    return forward


def _rotary_qkv(attn, hidden_states, position_ids, layout):
    """InternLM2's queries, keys and values, rotary applied: each (B, heads, T, D).

    cos and sin are the row's, computed by its first layer and kept in ``layout.rotary``.
    """
    mod = _modeling_module(attn)
    bsz, q_len, _ = hidden_states.shape
    groups = attn.num_key_value_groups
    # wqkv packs, per kv head, `groups` query heads then one key and one value.
    qkv = attn.wqkv(hidden_states).view(bsz, q_len, attn.num_key_value_heads, groups + 2, attn.head_dim)
    q = qkv[..., :groups, :].reshape(bsz, q_len, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = qkv[..., -2, :].transpose(1, 2)
    v = qkv[..., -1, :].transpose(1, 2)
    # the positions themselves, by storage: a row (or a sequence-parallel slice of it) has one set
    key = (v.dtype, v.device, tuple(position_ids.shape), position_ids.data_ptr(), position_ids.storage_offset())
    if key not in layout.rotary:
        layout.rotary[key] = attn.rotary_emb(v, position_ids)
    cos, sin = layout.rotary[key]
    q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _shared_prefix_forward(attn, hidden_states, position_ids, shared: SharedPrefix):
    """The attention output (before ``wo``) of one shared-prefix row."""
    bsz, q_len, _ = hidden_states.shape
    if q_len != len(shared.group_ids):
        raise ValueError(f"the shared-prefix layout has {len(shared.group_ids)} tokens but the row has {q_len}")
    q, k, v = _rotary_qkv(attn, hidden_states, position_ids, shared)  # (1, H, T, D)
    if shared.backend == "flex" and q.device.type == "cpu" and q.requires_grad:
        raise ConfigError(FLEX_CPU_TRAINING)
    # compiled FlexAttention on CUDA; on CPU (forced there, scoring only) eager, exact but slow
    out = shared_prefix_attention.prefix_attention(q, k, v, shared.group_ids, shared.member_ids, shared.backend,
                                          mask=shared.mask(), compiled=q.device.type == "cuda")
    return out.to(hidden_states.dtype).transpose(1, 2).reshape(bsz, q_len, attn.hidden_size)


def dispatch_varlen_attention(model, backend: str) -> int:
    """Install the varlen forward on every InternLM2 attention module.

    Returns:
        How many modules were patched.

    Raises:
        ConfigError: No InternLM2 attention module was found, or the model uses
            tensor-parallel weight slicing (``pretraining_tp > 1``).
    """
    if getattr(getattr(model, "config", None), "pretraining_tp", 1) > 1:
        raise ConfigError("varlen attention does not support pretraining_tp > 1")
    n = 0
    for module in model.modules():
        if type(module).__name__.startswith("InternLM2") and hasattr(module, "wqkv"):
            module.forward = types.MethodType(make_internlm2_varlen_forward(module.forward, backend), module)
            n += 1
    if n == 0:
        raise ConfigError(f"no InternLM2 attention module found in {type(model).__name__} for varlen attention")
    return n
