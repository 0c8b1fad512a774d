"""Convert a trained checkpoint into a verified Hugging Face POLAR model.

Usage:
    python -m polar_xtuner.convert CONFIG CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32]
        [--max-shard-size 5GB] [--force] [--no-verify] [--adapter]

CHECKPOINT is a ``.pth`` file (training without DeepSpeed), a DeepSpeed
checkpoint directory (``iter_N.pth/`` from ZeRO-1/2/3, any number of ranks),
or a work dir (its ``last_checkpoint`` is used). A LoRA checkpoint is merged
into the config's base model, or with ``--adapter`` written as a PEFT adapter
directory (adapters plus the trained value head); one whose value head is
missing or untrained is refused.

The conversion is strict: every tensor of the model must come from the
checkpoint, and a missing, unexpected or mis-shaped key is an error naming the
keys. Weights are assigned into a model built on the meta device and cast
tensor by tensor, giving memory-mapped pages back as they are used, so the
process does not hold two full copies (except inside DeepSpeed's own merge of
ZeRO-1/2 partitions, see bench/README.md). After saving, the output is loaded fresh
and checked two ways: every saved tensor must equal, bit for bit, the trained
weight cast to the output dtype, and the scores of a few pairs must stay within
the dtype's tolerance of the trained weights' scores (the largest difference
is printed).

CHECKPOINT as a work dir: the checkpoint its ``last_checkpoint`` names is
looked up by name inside the work dir (a copied work dir converts its own
checkpoint). A truncated checkpoint, base-model or written file is named.

Exit codes: 0 success, 2 bad input (paths, config, checkpoint, a truncated
file), 3 the verification failed, 130/143 interrupted (SIGINT/SIGTERM; OUT_DIR
left as it was).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from polar_xtuner.cli.entry import entry_point
from polar_xtuner.cli.flags import ArgumentParser, non_empty, size
from polar_xtuner.convert.lora import LoraCheckpointError, adapted_model, is_lora_state_dict, merge, save_adapter
from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.errors import UserError, VerificationError
from polar_xtuner.hf_layout import (
    AUTO_MAP,
    check_files_whole,
    copy_remote_code,
    load_failure,
    model_dir_entry,
    remember_code,
    remote_code_allowed,
)
from polar_xtuner.outputs import atomic_dir, check_writable_dir, output_target, refuse_overlap, refuse_replacing
from polar_xtuner.precision import (
    HF_NAMES,  # short name -> HF config name
    to_dtype,
)
from polar_xtuner.records import iter_records
from polar_xtuner.scoring.local import load_model, score_records
from polar_xtuner.train.checkpoint import (
    Checkpoint,
    assign_state_dict,
    build_empty_model,
    cast_releasing,
    deepspeed_dtype_name,
    load_training_state_dict,
    resolve_checkpoint,
    to_hf_keys,
    training_dtype_name,
)


class ConvertError(UserError):
    """The converter's own refusals: the config, OUT_DIR, the flags, the disk (exit 2).

    Faults of the checkpoint itself are the checkpoint layer's :class:`CheckpointError`.
    """
# Largest allowed |score difference| / max(1, |score|) after a save/load round trip,
# for every dtype: both sides score in fp32 with the same weights (the trained ones
# rounded to the saved dtype), and the weights are compared bit for bit, so this
# only bounds the kernels.
# CPU runs once moved the trained demo model's scores by 2.3e-3 with identical
# weights: MKL's default path depends on operand alignment (fixed by MKL_CBWR,
# see polar_xtuner/__init__.py). The margin stays for BLAS builds without that
# mode; the bit-for-bit weight check is what proves the conversion.
SCORE_TOLERANCE = 5e-3
VERIFY_PAIRS = 8


def verify_records(cfg, n: int = VERIFY_PAIRS) -> list[dict]:
    """A few pairs to compare scores on: the config's own data, if readable."""
    files = cfg.get("train_dataloader", {}).get("dataset", {}).get("data_files")
    for path in [files] if isinstance(files, str) else list(files or []):
        try:
            recs = []
            for item in iter_records(path):
                if item.record is not None:
                    recs.append(item.record)
                if len(recs) == n:
                    break
            if recs:
                return recs
        except Exception:  # noqa: BLE001 - fall back to built-in pairs
            pass
    return [
        {"prompt": "What is the capital of China?", "reference": "Beijing.",
         "chosen": "Beijing.", "rejected": "Shanghai."},
        {"prompt": "How many r's are in 'strawberry'?", "reference": "3.",
         "chosen": "There are three.", "rejected": "There are two."},
    ]


def write_model_card(out_dir: str, config_path: str, ckpt: Checkpoint, dtype: str, max_diff: float | None, cfg):
    data = cfg.get("train_dataloader", {}).get("dataset", {}).get("data_files")
    diff = "not run (--no-verify)" if max_diff is None else f"largest score difference {max_diff:.3g}"
    text = f"""---
library_name: transformers
license: apache-2.0
tags: [reward-model, POLAR, xtuner]
---
# POLAR reward model (fine-tuned)

Converted by `tools/convert.sh` from an xtuner training run.

| | |
|---|---|
| config | `{config_path}` |
| checkpoint | `{ckpt.path}` ({ckpt.kind}) |
| base model | `{cfg.get('pretrained_model_name_or_path', '?')}` |
| training data | `{data}` |
| dtype | {dtype} |
| verification | {diff} |

Load with `AutoModel.from_pretrained(path, trust_remote_code=True)`. Inputs are
built as `prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + candidate`
followed by `[UNUSED_TOKEN_130]`; the score is the value head at that token
(see `polar_xtuner.encoding` in the recipe repository).
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def clean_config(out_dir: str, reward_token_id: int, dtype_name: str) -> None:
    """Drop training-only settings and point auto_map at the copied code."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        c = json.load(f)
    for k in ("attn_implementation", "_attn_implementation_autoset", "_name_or_path"):
        c.pop(k, None)
    c["auto_map"] = dict(AUTO_MAP)
    c["architectures"] = ["InternLM2ForRewardModel"]
    c["reward_token_id"] = reward_token_id
    c["torch_dtype"] = HF_NAMES[dtype_name]
    c["use_cache"] = True
    with open(path, "w") as f:
        json.dump(c, f, indent=2)


@dataclass(frozen=True)
class ConvertSettings:
    """What one conversion is asked to do: one field per flag of ``tools/convert.sh``.

    Attributes:
        config: The xtuner config the model was trained with.
        checkpoint: A ``.pth`` file, a DeepSpeed checkpoint directory, or a work dir.
        out_dir: The HF model directory to write (replaced whole, only when complete).
        dtype: Weights dtype (``bf16``, ``fp16``, ``fp32``); None: the training dtype.
        max_shard_size: Largest safetensors shard, e.g. ``"5GB"``.
        force: Replace a non-empty ``out_dir`` that holds a model directory's files only.
        verify: Score the written model against the trained weights (and compare them bit for bit).
        adapter: Write a LoRA checkpoint as a PEFT adapter directory instead of merging it.
        trust_remote_code: Run the config's model directory's own code where this project did not ship it.
    """

    config: str
    checkpoint: str
    out_dir: str
    dtype: str | None = None
    max_shard_size: str = "5GB"
    force: bool = False
    verify: bool = True
    adapter: bool = False
    trust_remote_code: bool = False


@dataclass
class LoraParts:
    """A LoRA checkpoint on its base model (:func:`polar_xtuner.convert.lora.adapted_model`)."""

    backbone: object  # the PEFT-wrapped backbone: merged into the model for a full-model output
    adapters: dict
    head: dict


@dataclass
class Conversion:
    """One conversion under way: its settings and what has been read and scored for it."""

    settings: ConvertSettings
    cfg: object
    model_dir: str
    ckpt: Checkpoint
    dtype: str
    lora: LoraParts | None = None
    tokenizer: object = None
    encoding: EncodingSettings | None = None
    records: list = field(default_factory=list)
    before: list | None = None  # the trained weights' scores of ``records`` (None: no verification)

    @property
    def torch_dtype(self):
        return to_dtype(self.dtype)

    @property
    def lengths(self) -> dict:
        return dict(max_length=self.encoding.max_length, max_response_length=self.encoding.max_response_length)


def convert(settings: ConvertSettings) -> float | None:
    """Convert and (by default) verify. Returns the largest score difference.

    A LoRA checkpoint (adapters plus the trained head) is merged into the
    config's base model; with ``settings.adapter`` it is written as a PEFT
    adapter directory instead (see :mod:`polar_xtuner.convert.lora`).
    Verification scores the un-merged adapted model before and the written
    output after.

    Raises:
        ConvertError: Bad paths, config or checkpoint.
        VerificationError: The saved model scores differently beyond tolerance.
    """
    job = plan(settings)
    model = load_trained(job)
    score_trained(job, model)
    # Everything is written and verified in a temporary sibling of OUT_DIR,
    # which replaces OUT_DIR whole only then: a killed, full-disk or failed
    # run leaves the previous output as it was, and --force never leaves an
    # earlier model's files (an old model.safetensors beside new shards would
    # be the one that loads).
    check_free_space(settings.out_dir, model, job.torch_dtype)
    held = [model]  # handed over, so that its memory goes when the writer drops it
    del model
    with atomic_dir(settings.out_dir) as work:
        max_diff = _write_and_verify(work, job, held)
    print(f"Wrote {settings.out_dir}", flush=True)
    return max_diff


def plan(settings: ConvertSettings) -> Conversion:
    """Read the config and find the checkpoint; refuse bad inputs and outputs before loading anything.

    Raises:
        ConvertError: A missing or unreadable config, code run without consent, an output
            over an input, a non-empty OUT_DIR without ``force``, an unknown dtype.
    """
    # Lazy: xtuner brings transformers, peft and mmengine (seconds); a bad flag is refused before.
    from mmengine.config import Config

    s = settings
    if not os.path.isfile(s.config):
        raise ConvertError(f"config {s.config}: no such file")
    try:
        cfg = Config.fromfile(s.config)
        model_dir = cfg.model.llm.pretrained_model_name_or_path
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad config
        raise ConvertError(f"config {s.config}: cannot read it ({e})") from None
    if os.path.isdir(str(model_dir)):  # the base model's code runs when it loads: ours, or the user's consent
        try:
            remote_code_allowed(model_dir, s.trust_remote_code)
        except UserError as e:
            raise ConvertError(f"the config's model {e}") from None
    ckpt = resolve_checkpoint(s.checkpoint)
    inputs = [("CONFIG", s.config), ("CHECKPOINT", s.checkpoint)]
    if os.path.isdir(str(model_dir)):  # its config and tokenizer are read (a LoRA's weights too): named if cut short
        check_files_whole(model_dir, "the config's model", "copy or download the base model again", weights=False)
        inputs.append(("the config's model", model_dir))
    data = cfg.get("train_dataloader", {}).get("dataset", {}).get("data_files")
    inputs += [("the config's data", f) for f in ([data] if isinstance(data, str) else list(data or []))]
    refuse_overlap({"OUT_DIR": s.out_dir}, inputs)
    check_writable_dir(s.out_dir, "OUT_DIR")
    refuse_replacing(s.out_dir, "OUT_DIR", s.force, model_dir_entry, ConvertError)
    dtype = s.dtype or deepspeed_dtype_name(ckpt) or training_dtype_name(cfg)
    if dtype not in HF_NAMES:
        raise ConvertError(f"--dtype must be one of {', '.join(HF_NAMES)}, got {dtype}")
    return Conversion(s, cfg, model_dir, ckpt, dtype)


def load_trained(job: Conversion):
    """The trained model in fp32: full weights assigned strictly, or a LoRA checkpoint on its base (``job.lora``).

    Raises:
        ConvertError: The base model does not load, ``adapter`` without a LoRA checkpoint, a bad LoRA checkpoint.
    """
    print(f"Loading {job.ckpt.kind} checkpoint {job.ckpt.path}", flush=True)
    state_dict = load_training_state_dict(job.ckpt)
    lora = is_lora_state_dict(state_dict)
    if job.settings.adapter and not lora:
        raise ConvertError(f"--adapter needs a LoRA checkpoint; {job.ckpt.path} holds full weights")
    try:
        if lora:
            model, backbone, adapters, head = adapted_model(job.cfg, job.model_dir, state_dict)
            job.lora = LoraParts(backbone, adapters, head)
            print(f"LoRA checkpoint: {len(adapters)} adapter tensors and the trained v_head on {job.model_dir}",
                  flush=True)
        else:
            model = build_empty_model(job.model_dir, torch.float32)
            assign_state_dict(model, to_hf_keys(state_dict), torch.float32)
    except OSError as e:
        raise ConvertError(f"cannot load the config's model {job.model_dir} ({e})") from None
    except LoraCheckpointError as e:
        raise ConvertError(f"{job.ckpt.path}: {e}") from None
    del state_dict
    gc.collect()
    return model.eval()


def score_trained(job: Conversion, model) -> None:
    """The tokenizer and training's encoding lengths, and (verifying) the trained weights' scores of a few pairs."""
    from xtuner.registry import BUILDER  # lazy, as in plan()

    try:
        job.tokenizer = BUILDER.build(job.cfg.tokenizer)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer file fails in many ways
        raise load_failure(str(job.model_dir), "tokenizer", e, "the config's model") from None
    job.encoding = training_encoding(job.cfg, model.config.reward_token_id)
    if not job.settings.verify:
        return
    job.records = verify_records(job.cfg)
    job.before = score_records(model, job.tokenizer, job.records, **job.lengths)
    if job.torch_dtype != torch.float32:
        # The check compares like with like: the saved model against these weights
        # rounded as they are saved (in place; the cast below leaves them as they are).
        # What rounding itself moves is reported, not refused: a deep random model
        # moved 0.24-0.96 in bf16 on an H200 run, while its weights were exact.
        trained = job.before
        round_weights(model, job.torch_dtype)
        job.before = score_records(model, job.tokenizer, job.records, **job.lengths)
        print(f"Rounding to {job.dtype} moves the trained weights' scores by up to "
              f"{max_relative_diff(job.before, trained):.3g} (relative); --dtype fp32 keeps them exactly", flush=True)


def check_free_space(out_dir: str, model, torch_dtype) -> None:
    """Refuse, before writing, an OUT_DIR whose file system cannot hold the weights.

    Raises:
        ConvertError: Less free space than the weights need (plus 5% and 64 MiB for the rest).
    """
    need = sum(p.numel() for p in model.state_dict().values()) * torch.finfo(torch_dtype).bits // 8
    need = int(need * 1.05) + (64 << 20)
    parent = os.path.dirname(output_target(out_dir))  # through a symlinked OUT_DIR
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConvertError(f"OUT_DIR {out_dir}: no space left on the device for the model (needs about "
                           f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free in {parent}); free some space "
                           f"or write elsewhere")


def _write_and_verify(work: str, job: Conversion, held: list):
    """Write the HF directory into ``work`` and verify it; returns the largest score difference (None: unverified)."""
    if job.settings.adapter:
        held.clear()  # the adapters and head are written from the checkpoint's own tensors
        return _write_adapter(work, job)
    return _write_model(work, job, held.pop())


def _write_adapter(work: str, job: Conversion):
    save_adapter(job.cfg, job.model_dir, job.lora.adapters, job.lora.head, work)
    job.tokenizer.save_pretrained(work)
    job.encoding.save(work)
    print(f"Saved the LoRA adapters and the trained v_head (PEFT, base {job.model_dir})", flush=True)
    max_diff = _verify_scores(work, "fp32", torch.float32, job) if job.settings.verify else None
    write_model_card(work, job.settings.config, job.ckpt, "fp32 adapter", max_diff, job.cfg)
    with open(os.path.join(work, "README.md"), "a", encoding="utf-8") as f:
        f.write("\nThis is a LoRA adapter directory (adapters plus the trained `v_head` as a "
                "`modules_to_save` module), not a full model: load it with\n"
                "`PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), path)`, "
                "`base` being `base_model_name_or_path` in adapter_config.json.\n")
    return max_diff


def _write_model(work: str, job: Conversion, model):
    verify = job.settings.verify
    if job.lora is not None:
        merge(model, job.lora.backbone)
    cast_releasing(model, job.torch_dtype, [job.ckpt.path] if job.ckpt.kind == "pth" else [])
    expected = weight_digests(model) if verify else None
    model.save_pretrained(work, max_shard_size=job.settings.max_shard_size, safe_serialization=True)
    del model
    gc.collect()
    job.tokenizer.save_pretrained(work)
    copy_remote_code(work)
    clean_config(work, job.encoding.reward_token_id, job.dtype)
    job.encoding.save(work)  # the lengths travel with the model to eval and serving
    remember_code(work)  # the base model's tokenizer code, if any, loads later without --trust-remote-code
    print(f"Saved {job.dtype} model", flush=True)

    max_diff = None
    if verify:
        # Load as saved, then score in fp32 like the trained weights: loading a
        # bf16 directory straight into fp32 would hold both copies at once.
        fresh, fresh_tok = load_model(work, device="cpu", dtype=job.torch_dtype)
        check_weights(expected, weight_digests(fresh), job.settings.out_dir)
        shards = [os.path.join(work, n) for n in os.listdir(work) if n.endswith(".safetensors")]
        cast_releasing(fresh, torch.float32, shards)
        max_diff = _verify_scores(job.settings.out_dir, job.dtype, None, job, (fresh, fresh_tok))
        del fresh
    write_model_card(work, job.settings.config, job.ckpt, job.dtype, max_diff, job.cfg)
    return max_diff


def round_weights(model, dtype) -> None:
    """Round every floating tensor the model file stores to ``dtype`` and back, in place.

    Parameters and persistent buffers: what save_pretrained writes. Buffers
    rebuilt at load (rotary frequencies) are left as they are.
    """
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point() and value.dtype != dtype:
                value.copy_(value.to(dtype))


def max_relative_diff(after, before) -> float:
    """Largest |a - b| / max(1, |b|) over paired (chosen, rejected) scores."""
    return max(abs(a - b) / max(1.0, abs(b)) for pa, pb in zip(after, before) for a, b in zip(pa, pb))


def _verify_scores(out_dir, dtype, load_dtype, job: Conversion, loaded=None) -> float:
    """Score the written output and compare with the trained model's scores.

    Both sides are scored in fp32 on CPU, the trained side with its weights
    rounded to ``dtype`` as saved, so the tolerance is fp32's for every dtype.

    Raises:
        VerificationError: A score differs beyond the dtype's tolerance.
    """
    fresh, fresh_tok = loaded or load_model(out_dir, device="cpu", dtype=load_dtype)
    after = score_records(fresh, fresh_tok, job.records, **job.lengths)
    max_diff = max_relative_diff(after, job.before)
    tol = SCORE_TOLERANCE
    print(f"Verify: {len(job.records)} pairs, largest relative score difference {max_diff:.3g} "
          f"(tolerance {tol:g}; {dtype} weights, fp32 scoring on both sides)", flush=True)
    if max_diff > tol:
        raise VerificationError(
            f"{out_dir} scores differ from the checkpoint by {max_diff:.3g} "
            f"(> {tol:g}, the checkpoint's weights rounded to {dtype} and the saved ones scored alike)"
        )
    return max_diff


def weight_digests(model) -> dict[str, str]:
    """A digest of every tensor's bytes, by state-dict key."""
    return {k: hashlib.blake2b(v.detach().contiguous().view(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()
            for k, v in model.state_dict().items()}


def check_weights(expected: dict[str, str], saved: dict[str, str], out_dir: str) -> None:
    """The saved tensors are exactly the trained ones (after the dtype cast).

    Raises:
        VerificationError: A tensor is missing, extra or differs.
    """
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    changed = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    problems = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing", missing), ("extra", extra), ("changed", changed)) if keys]
    if problems:
        raise VerificationError(f"{out_dir} does not hold the trained weights ({'; '.join(problems)})")
    print(f"Verify: {len(saved)} tensors equal the trained weights bit for bit", flush=True)


def training_encoding(cfg, model_reward_token_id: int | None):
    """The encoding lengths training used, read from the config's dataset.

    The dataset entry holds what training really used (``--cfg-options`` on
    it included); the top-level variables are the fallback.

    Raises:
        ConvertError: The config names no lengths (conversion would otherwise
            write defaults the model was not trained with).
    """
    dataset = cfg.get("train_dataloader", {}).get("dataset", {}) or {}
    values = {}
    for key in ("max_length", "max_response_length"):
        value = dataset.get(key, cfg.get(key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvertError(f"config: train_dataloader.dataset.{key} must be a positive integer, got {value!r}")
        values[key] = value
    reward_token_id = dataset.get("reward_token_id", cfg.get("reward_token_id")) or model_reward_token_id
    return EncodingSettings(**values, reward_token_id=reward_token_id, source="training config")


def return_freed_memory() -> None:
    """Serve large allocations with mmap so that freed weights go back to the OS.

    glibc raises its mmap threshold to 32 MB after the first large free, so the
    many 8-32 MB tensors of a conversion then live on the heap, and freeing
    the trained copy would not lower the peak of loading the saved one.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (fixed)
    except OSError:  # not glibc: nothing to tune
        pass


@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(
        prog="tools/convert.sh", description="Convert a trained POLAR checkpoint to a verified HF model.")
    p.add_argument("config", type=non_empty, help="the xtuner config used for training")
    p.add_argument("checkpoint", type=non_empty, help=".pth file, DeepSpeed checkpoint dir, or work dir")
    p.add_argument("out_dir", type=non_empty, help="output directory (HF model layout)")
    p.add_argument("--dtype", choices=sorted(HF_NAMES), default=None,
                   help="weights dtype (default: the training dtype: DeepSpeed's, else the config's AMP dtype, "
                        "else fp32)")
    p.add_argument("--max-shard-size", default="5GB", type=size, help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUT_DIR whole (none of its old files survive) when it holds a model "
                        "directory's files only; anything else is named and kept")
    p.add_argument("--no-verify", action="store_true", help="skip scoring the output")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the config's model directory's own code where this project did not ship it")
    p.add_argument("--adapter", action="store_true",
                   help="LoRA checkpoints: write the adapters and the trained v_head as a PEFT directory "
                        "(default: merge them into the base model)")
    args = p.parse_args(argv)
    if args.adapter and args.dtype not in (None, "fp32"):
        p.error("--adapter writes fp32 adapters; --dtype applies to merged models")
    try:
        convert(ConvertSettings(args.config, args.checkpoint, args.out_dir, args.dtype, args.max_shard_size,
                                args.force, not args.no_verify, args.adapter, args.trust_remote_code))
    except VerificationError as e:
        raise VerificationError(f"verification failed: {e}; {args.out_dir} was left as it was") from None
    return 0

