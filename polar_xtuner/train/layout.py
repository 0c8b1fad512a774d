"""The attention layout of a row, carried with the row through every forward, recomputes included.

A packed row is only correct when its attention sees the row's layout: the
sample bounds of a varlen row, or the groups of a shared-prefix row
(:mod:`polar_xtuner.encoding.shared_prefix`). Activation checkpointing runs each
layer's forward a second time during backward, after the step's forward has
returned, on the autograd engine's thread. A layout published only around the
forward (a MessageHub entry, a context manager) is gone by then, so the
recompute attends over whatever it finds and every gradient is wrong while the
loss looks right.

Here the layout is a value:

* :class:`PolarRewardModel <polar_xtuner.train.model.PolarRewardModel>`
  builds it once per step from the row (:func:`row_layout` makes it current for
  its forward);
* every layer that activation checkpointing wraps receives it as an argument
  of the checkpointed call (:func:`install_recompute`), so the recompute,
  reentrant or not, replays the same layout;
* the patched attention (:mod:`polar_xtuner.train.attention`) reads
  :func:`current_layout` and raises :class:`MissingLayoutError` when there is
  none: a forward never falls back to attending over the whole row.

Padded batches (evaluation) declare :data:`WHOLE`: the module's own attention.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from polar_xtuner.encoding.shared_prefix import dense_mask
from polar_xtuner.errors import ConfigError, PolarError
from polar_xtuner.train.shared_prefix_attention import block_mask, segments


class MissingLayoutError(PolarError, RuntimeError):
    """A patched attention ran outside any row layout (a forward or a recompute that lost it)."""


@dataclass(frozen=True, eq=False)
class WholeRows:
    """Each batch row is one sequence (padding masked): the model's own attention."""


WHOLE = WholeRows()


@dataclass(frozen=True, eq=False)
class Packed:
    """Samples packed in one row; attention stays causal inside each.

    Attributes:
        cu_seqlens: (N+1,) int32 sample bounds on the row's device, 0 first.
        max_seqlen: The longest sample.
        tokens: ``cu_seqlens[-1]``, read once per row (not once per layer: a host sync on CUDA).
        rotary: The row's rotary (cos, sin) per dtype, device and positions, computed by the first
            layer and reused by the others and by every recompute (each layer's rotary embedding is the same).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    tokens: int
    rotary: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cumulative_len, max_seqlen, device) -> "Packed":
        """From xtuner's varlen keys (``cumulative_len`` may be the one-element list its collate gives)."""
        if isinstance(cumulative_len, (list, tuple)):
            if len(cumulative_len) != 1:
                raise ValueError(f"varlen rows take a batch size of 1, got {len(cumulative_len)} rows' bounds")
            cumulative_len = cumulative_len[0]
        cu = torch.as_tensor(cumulative_len).to(device=device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        return cls(cu, int(max_seqlen), int(cu[-1]))


@dataclass(eq=False)
class SharedPrefix:
    """A row of shared-prefix groups; the backend's mask is built once and reused by every layer and recompute.

    Attributes:
        group_ids, member_ids: (T,) the row's layout (:class:`polar_xtuner.encoding.shared_prefix.SharedPrefixRow`).
        backend: One of :data:`polar_xtuner.train.shared_prefix_attention.BACKENDS`.
        rotary: As :attr:`Packed.rotary`.
    """

    group_ids: torch.Tensor
    member_ids: torch.Tensor
    backend: str
    _mask: object = field(default=None, repr=False)
    rotary: dict = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return len(self.group_ids)

    def mask(self):
        if self._mask is None:
            build = {"flex": block_mask, "sdpa": segments, "dense": dense_mask}[self.backend]
            self._mask = build(self.group_ids, self.member_ids)
        return self._mask


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("polar_row_layout", default=None)


@contextlib.contextmanager
def row_layout(layout):
    """Within this block (this thread), forwards of the patched attention use ``layout``."""
    token = _CURRENT.set(layout)
    try:
        yield layout
    finally:
        _CURRENT.reset(token)


def current_layout():
    """The layout the enclosing :func:`row_layout` set, or None."""
    return _CURRENT.get()


def require_layout():
    """:func:`current_layout`, or :class:`MissingLayoutError` where there is none."""
    layout = _CURRENT.get()
    if layout is None:
        raise MissingLayoutError(
            "a packed-attention layer ran without its row's layout (a forward outside "
            "PolarRewardModel.forward, or an activation-checkpoint recompute that does not replay it: "
            "call polar_xtuner.train.layout.install_recompute after enabling checkpointing)")
    return layout


def _replay(layout, fn, *args, **kwargs):
    with row_layout(layout):
        return fn(*args, **kwargs)


def replaying(checkpoint_fn):
    """Wrap a checkpoint function so its recompute sees the layout of the forward it repeats.

    ``checkpoint_fn`` is called as transformers' ``_gradient_checkpointing_func``
    (``checkpoint_fn(layer.__call__, *args)``). The layout current at the call
    becomes an argument of the checkpointed function: torch's checkpoint, and
    DeepSpeed's, hand the same arguments to the recompute. A layer marked
    ``polar_recompute = False`` (selective checkpointing) runs plainly, its
    activations kept.
    """
    if getattr(checkpoint_fn, "polar_replays_layout", False):
        return checkpoint_fn

    def checkpoint(fn, *args, **kwargs):
        if getattr(getattr(fn, "__self__", None), "polar_recompute", True) is False:
            return fn(*args, **kwargs)
        return checkpoint_fn(_replay, current_layout(), fn, *args, **kwargs)

    checkpoint.polar_replays_layout = True
    checkpoint.wrapped = checkpoint_fn
    return checkpoint


def checkpoint_setting(value):
    """The ``activation_checkpointing`` setting as ``"full"``, ``"off"`` or a layer count k >= 1.

    True and ``"full"``: recompute every layer; False, ``"off"`` and 0: none;
    an int k: the first k layers (selective: the rest keep their activations).

    Raises:
        ConfigError: Any other value.
    """
    if value is True or value == "full":
        return "full"
    if value is False or value is None or value == "off" or (type(value) is int and value == 0):
        return "off"
    if type(value) is int and value > 0:
        return value
    raise ConfigError(f"activation_checkpointing must be True ('full'), False ('off') or a number of "
                      f"layers >= 0 to recompute, got {value!r}")


def install_recompute(llm, setting) -> int:
    """Make every checkpointing module of ``llm`` replay row layouts; with an int k, recompute the first k layers.

    Call it after everything that (re)enables checkpointing (xtuner's
    ``RewardModel``, PEFT's ``prepare_model_for_kbit_training``).

    Returns:
        How many layers are recomputed in backward.
    """
    setting = checkpoint_setting(setting)
    recomputed = 0
    for module in llm.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = replaying(module._gradient_checkpointing_func)
        for i, layer in enumerate(getattr(module, "layers", ())):
            layer.polar_recompute = setting == "full" or i < setting
            recomputed += layer.polar_recompute
    return recomputed
