"""The checkpoint layer: find a training checkpoint, read it, map its keys, give pages back.

Used by :mod:`polar_xtuner.convert.export` (which orchestrates conversion,
verification and the HF layout). A checkpoint is a ``.pth`` file (training
without DeepSpeed), a DeepSpeed directory (``iter_N.pth/``, ZeRO-1/2/3, any
number of ranks, read with DeepSpeed's own lazy reconstruction), or a work dir
(its ``last_checkpoint``). Weights go into a model built on the meta device,
cast tensor by tensor, and memory-mapped source pages are given back to the OS
as they are used (Linux ``madvise``), so a conversion never holds two copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from polar_xtuner.errors import UserError
from polar_xtuner.hf_layout import file_damage, text_only_transformers
from polar_xtuner.precision import SCORING_ATTENTION, dtype_name


class CheckpointError(UserError):
    """A user mistake: bad path, config or checkpoint. Exit code 2."""


@dataclass
class Checkpoint:
    """Where the weights are and in what format ("pth" or "deepspeed")."""

    path: str
    kind: str


POINTER = "last_checkpoint"  # the file in which xtuner/mmengine name a work dir's latest checkpoint


def resolve_checkpoint(path: str) -> Checkpoint:
    """Find the checkpoint behind a .pth file, DeepSpeed dir or work dir.

    A work dir's ``last_checkpoint`` is read with :func:`checkpoint_in_work_dir`:
    the checkpoint it names is looked up inside the work dir.

    Raises:
        CheckpointError: No checkpoint there, naming the path (or the pointer file).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, POINTER)) and not _is_deepspeed_dir(path):
        return _checkpoint_at(checkpoint_in_work_dir(path))
    return _checkpoint_at(path)


def _is_deepspeed_dir(path: str) -> bool:
    return any(n.endswith("model_states.pt") for n in os.listdir(path))


def _checkpoint_at(path: str) -> Checkpoint:
    """The checkpoint at ``path`` itself: a .pth file or a DeepSpeed directory (no pointer is followed)."""
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"checkpoint {path}: empty file")
        return Checkpoint(path, "pth")
    if _is_deepspeed_dir(path):
        return Checkpoint(path, "deepspeed")
    if not os.listdir(path):
        raise CheckpointError(f"checkpoint {path}: empty directory")
    raise CheckpointError(
        f"checkpoint {path}: neither a DeepSpeed checkpoint (no *model_states.pt) "
        f"nor a work dir (no {POINTER})"
    )


def checkpoint_in_work_dir(work_dir: str) -> str:
    """The checkpoint a work dir's ``last_checkpoint`` names, looked up by its file name inside the work dir.

    xtuner writes the absolute path the run saved to, so a work dir that was
    copied or moved names the original's checkpoint; the one inside the
    directory given is what the user means (a line on stderr says so when the
    two differ). The training scripts' ``--resume auto`` and the converter
    both read the pointer here.

    Raises:
        CheckpointError: The pointer is unreadable or empty, names itself or the
            directory, or names a checkpoint that is not inside the directory.
    """
    pointer = os.path.join(work_dir, POINTER)
    fix = (f"write the path of one of its checkpoints (iter_N.pth) into {pointer}, or pass that checkpoint "
           f"instead of the work dir")
    try:
        with open(pointer, encoding="utf-8") as f:
            named = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot read it ({e}); {fix}") from None
    if not named:
        raise CheckpointError(f"{pointer} is empty; {fix}")
    name = os.path.basename(named.rstrip("/" + os.sep))
    inside = os.path.join(work_dir, name)
    itself = {os.path.realpath(work_dir), os.path.realpath(pointer)}
    if name in ("", ".", "..", POINTER) or itself & {
            os.path.realpath(inside), os.path.realpath(named), os.path.realpath(os.path.join(work_dir, named))}:
        raise CheckpointError(f"{pointer} names {named}, which is the pointer or the work dir itself, not a "
                              f"checkpoint; {fix}")
    if not os.path.exists(inside):
        raise CheckpointError(f"{pointer} names {named}, which does not exist in {work_dir} (looked for {inside}); "
                              f"{fix}")
    if os.path.isabs(named) and os.path.realpath(named) != os.path.realpath(inside):
        import sys

        print(f"note: {pointer} names {named}; using {inside}, the checkpoint of that name in {work_dir} "
              f"(a copied or moved work dir?)", file=sys.stderr)
    return inside


def damaged_checkpoint(path: str, reason: str) -> CheckpointError:
    """The error for a checkpoint file that does not load, naming the file itself."""
    return CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint, or truncated ({reason}); copy it again "
                           f"from where it was saved, or convert an earlier checkpoint")


def checkpoint_files(ckpt: Checkpoint) -> list[str]:
    """The files a checkpoint is read from: the .pth, or DeepSpeed's model and optimizer states."""
    import glob

    if ckpt.kind == "pth":
        return [ckpt.path]
    return sorted(f for pattern in ("*model_states.pt", "*optim_states.pt")
                  for f in glob.glob(os.path.join(ckpt.path, pattern)))


def check_checkpoint_files(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint with a truncated or damaged file before reading it (cheap: no tensor is read).

    Raises:
        CheckpointError: naming the file.
    """
    for path in checkpoint_files(ckpt):
        reason = file_damage(path)
        if reason:
            raise damaged_checkpoint(path, reason)


def _unreadable_file(ckpt: Checkpoint) -> tuple[str, str] | None:
    """(file, why) for the first checkpoint file that does not unpickle, or None."""
    import torch

    for path in checkpoint_files(ckpt):
        try:
            torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001 - whatever fails names the file
            return path, f"{type(e).__name__}: {str(e)[:200]}"
    return None


def load_training_state_dict(ckpt: Checkpoint) -> dict:
    """The training model's fp32 state dict (keys as in PolarRewardModel).

    Raises:
        CheckpointError: A file is truncated or damaged (named), or holds no state dict.
    """
    import torch

    check_checkpoint_files(ckpt)
    if ckpt.kind == "deepspeed":
        text_only_transformers()  # DeepSpeed imports transformers' model classes
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        parent, tag = os.path.split(os.path.abspath(ckpt.path))
        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag, lazy_mode=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
            bad = _unreadable_file(ckpt)
            if bad:
                raise damaged_checkpoint(*bad) from None
            raise CheckpointError(f"checkpoint {ckpt.path}: cannot read the DeepSpeed states "
                                  f"({type(e).__name__}: {str(e)[:300]}); is a file truncated or missing?") from None
        return _materialize(lazy, ckpt.path)
    try:
        # mmap: tensors stay on disk until they are assigned into the model.
        obj = torch.load(ckpt.path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise damaged_checkpoint(ckpt.path, f"{type(e).__name__}: {str(e)[:300]}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {ckpt.path}: holds no state dict")
    return obj


def _materialize(lazy: dict, ckpt_dir: str) -> dict:
    """DeepSpeed's lazy state dict as tensors, giving back file pages as it goes.

    DeepSpeed reads the optimizer shards through a memory map; the fp32
    master partitions it merges would stay resident as clean file pages (a
    second copy in RSS). ZeRO-3 tensors are gathered one at a time here, and
    after each the shards' pages go back to the OS (ZeRO-1/2 merge eagerly,
    so their pages go after the merge).
    """
    import glob

    ranges = [r for f in glob.glob(os.path.join(ckpt_dir, "*optim_states.pt")) for r in _mapped_ranges(f)]
    out, first_name = {}, {}
    for name in list(lazy):
        value = lazy.pop(name)
        if id(value) in first_name:  # a tensor shared by two names stays shared
            out[name] = out[first_name[id(value)]]
            continue
        first_name[id(value)] = name
        out[name] = value.contiguous()
        _drop_pages(ranges)
    return out


def to_hf_keys(state_dict: dict) -> dict:
    """Map PolarRewardModel keys (``llm.*``, ``v_head.*``) to the HF model's."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("llm."):
            out["model." + k[4:]] = v
        else:
            out[k] = v
    return out


def training_dtype_name(cfg) -> str:
    """The dtype the config trained in: bf16/fp16 from AMP, else fp32."""
    dtype = cfg.get("optim_wrapper", {}).get("dtype")
    try:
        return dtype_name(dtype) if dtype else "fp32"
    except ValueError:
        return "fp32"


def deepspeed_dtype_name(ckpt: Checkpoint) -> str | None:
    """The dtype a DeepSpeed run trained in, from the config saved with it."""
    import glob

    import torch

    files = sorted(glob.glob(os.path.join(ckpt.path, "*model_states.pt")))
    if ckpt.kind != "deepspeed" or not files:
        return None
    try:
        # mmap: only the small ds_config entry is actually read.
        ds = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False).get("ds_config") or {}
    except Exception:  # noqa: BLE001 - fall back to the config's optimizer dtype
        return None
    for key, name in (("bf16", "bf16"), ("fp16", "fp16")):
        if (ds.get(key) or {}).get("enabled") is True:
            return name
    return "fp32"


def build_empty_model(model_dir: str, dtype):
    """An InternLM2ForRewardModel with parameters on the meta device."""
    text_only_transformers()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    # The kernel the saved model is loaded with, so verification compares weights, not kernels.
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True, attn_implementation=SCORING_ATTENTION)
    with init_empty_weights(include_buffers=False):
        model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=dtype)
    return model


def assign_state_dict(model, state_dict: dict, dtype) -> None:
    """Load strictly, casting tensor by tensor, without a second full copy."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        problems.append(f"mis-shaped: {'; '.join(shapes[:10])}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not match the config's model (wrong config?): " + " | ".join(problems)
        )
    for k in list(state_dict):
        state_dict[k] = state_dict[k].to(dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    state_dict.clear()


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges where this process maps the file ``path`` (Linux)."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == real:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:  # not Linux: nothing is released early, nothing breaks
        pass
    return ranges


def _madvise_dontneed(start: int, end: int) -> None:
    import ctypes
    import mmap

    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                              getattr(mmap, "MADV_DONTNEED", 4))


def _drop_pages(ranges) -> None:
    """Drop whole private, read-only-in-use file mappings' pages (they read back from the file)."""
    for start, end in ranges:
        _madvise_dontneed(start, end)


def _drop_file_pages(tensor, ranges) -> None:
    """Return the pages of a tensor memory-mapped from the checkpoint to the OS.

    ``torch.load(mmap=True)`` maps the file privately and we only read it, so
    its pages are clean copies of the file: dropping them frees memory now,
    and a later read would only fetch them again. Anything not inside the
    file's mapping is left alone (dropping anonymous memory would zero it).
    """
    import mmap

    lo = tensor.data_ptr()
    hi = lo + tensor.numel() * tensor.element_size()
    if not any(a <= lo and hi <= b for a, b in ranges):
        return
    page = mmap.PAGESIZE
    start, end = -(-lo // page) * page, hi // page * page  # whole pages inside the tensor only
    if end > start:
        _madvise_dontneed(start, end)


def cast_releasing(model, dtype, mapped_files=()) -> None:
    """``model.to(dtype)``, tensor by tensor, freeing each source as it goes.

    With weights memory-mapped from ``mapped_files`` (a .pth, or safetensors
    shards), ``Module.to`` would keep every source page resident until the
    end (a bf16 conversion peaked at 1.5 fp32 copies); here each tensor's
    pages go as it is cast.
    """
    ranges = [r for path in mapped_files for r in _mapped_ranges(path)]
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for value in table.values():
                if value is None or not value.is_floating_point() or value.dtype == dtype:
                    continue
                old = value.data
                value.data = old.to(dtype)
                if ranges:
                    _drop_file_pages(old, ranges)
                del old
