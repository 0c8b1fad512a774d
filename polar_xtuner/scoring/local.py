"""Scoring with a local POLAR model: loading a model dir, scoring token ids and records.

Pairs are encoded with :class:`polar_xtuner.encoding.PolarEncoder` (the same
text as training and serving), sorted by length and scored in batches. The
score is read at the last attended token, found from the attention mask, and
position ids count real tokens only, so left and right padding give the same
scores.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from tqdm import tqdm

from polar_xtuner.constants import DEFAULT_EVAL_BATCH_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_MAX_RESPONSE_LENGTH
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.encoding.shared_prefix import Group, dense_mask, group_answers, pack_groups, rows_by_length, scoring_parts, spread_scores
from polar_xtuner.errors import UserError
from polar_xtuner.hf_layout import (check_files_whole, check_model_dir, load_failure, remote_code_allowed,
                                    text_only_transformers)
from polar_xtuner.precision import SCORING_ATTENTION, default_device, eval_dtype
from polar_xtuner.records import record_answers


def load_model(path: str, device: str | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False):
    """Load a POLAR model directory (or a LoRA adapter directory): bf16 on GPU, float32 on CPU.

    Args:
        trust_remote_code: Run Python code in the directory even when it is
            not the code this project ships (see :mod:`polar_xtuner.hf_layout`).

    Returns:
        (model, tokenizer)

    Raises:
        UserError: The directory holds code we did not ship and trust_remote_code is off;
            a piece is missing, or a file (named) is truncated; it is a training work dir.
    """
    from transformers import AutoTokenizer

    device = device or default_device()
    if dtype is None:
        dtype = eval_dtype(device)
    check_model_dir(path)  # every file too: a truncated one is named before loading
    base = _adapter_base(path)
    if base and os.path.isdir(base):  # an adapter directory's local base model: its weights load too
        check_files_whole(base, f"{path}'s base model", "copy the base model again")
    trust = remote_code_allowed(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
        raise load_failure(path, "tokenizer", e) from None
    try:
        return _load_weights(path, device, dtype, trust, trust_remote_code), tokenizer
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        if isinstance(e, MemoryError):
            raise
        raise load_failure(path, "model", e) from None


def _adapter_base(path: str) -> str | None:
    """An adapter directory's ``base_model_name_or_path`` (None for a full model or when unreadable)."""
    import json

    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _load_weights(path, device, dtype, trust, trust_remote_code):
    text_only_transformers()
    from transformers import AutoModel

    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        # A LoRA adapter directory (tools/convert.sh --adapter): its base model
        # plus the adapters and trained head, merged in memory.
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        model = AutoModel.from_pretrained(base, trust_remote_code=remote_code_allowed(base, True if not
                                          os.path.isdir(base) else trust_remote_code),
                                          torch_dtype=dtype, attn_implementation=SCORING_ATTENTION)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModel.from_pretrained(
            path, trust_remote_code=trust, torch_dtype=dtype, attn_implementation=SCORING_ATTENTION
        )
    return model.to(device).eval()


def pad_id(tokenizer) -> int:
    """The padding id: pad, or EOS where the tokenizer has no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def score_ids(model, ids_list: Sequence[list[int]], pad_id: int, padding_side: str = "left",
              batch_size: int = DEFAULT_EVAL_BATCH_SIZE, progress: bool = False) -> list[float]:
    """Score token-id sequences (each ending with the reward token).

    ``model`` is a HF ``InternLM2ForRewardModel`` or the training
    ``PolarRewardModel``; both have a backbone and a ``v_head``.

    Sequences are sorted by length so each batch pads little; results come
    back in input order.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    scores = [0.0] * len(ids_list)
    # PolarRewardModel (training) keeps the backbone in .llm, the HF class in .model.
    backbone = model.llm if hasattr(model, "llm") else model.model
    for start in tqdm(range(0, len(order), batch_size), desc="Scoring", disable=not progress,
                      unit="batch"):
        idx = order[start:start + batch_size]
        seqs = [ids_list[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            if padding_side == "left":
                ids[row, width - len(s):] = torch.tensor(s)
                mask[row, width - len(s):] = 1
            else:
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids)[0]
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # last attended position
        values = model.v_head(hidden[torch.arange(len(seqs), device=device), last]).squeeze(-1)
        for i, v in zip(idx, values.float().tolist()):
            scores[i] = v
    return scores


# Shared-prefix scoring puts groups together in a row up to this many tokens (0:
# one group a row, rows batched with padding: the fastest measured on CPU, as a
# row's mask grows with its length squared; bench/README.md), and keeps a
# batch's dense masks within MASK_ELEMENTS (128 MB in fp32).
SHARED_ROW_TOKENS = 0
MASK_ELEMENTS = 2**25
# The longest shared-prefix row: a group longer than this (many long answers to
# one prompt) is scored in parts, so one row's mask stays within MASK_ELEMENTS.
MAX_ROW_TOKENS = int(MASK_ELEMENTS**0.5)


@torch.no_grad()
def score_groups(model, groups: Sequence[Group], pad_id: int, row_tokens: int,
                 batch_size: int = DEFAULT_EVAL_BATCH_SIZE, progress: bool = False) -> list[list[float]]:
    """Each group's candidate scores, every candidate scored after one copy of its prefix.

    Groups are laid out in rows of about ``row_tokens`` (a longer group gets a
    row of its own), ``batch_size`` rows a batch, with a 4-D mask that lets a
    candidate see its prefix and itself only (:mod:`polar_xtuner.encoding.shared_prefix`)
    and positions that continue from the prefix: each score is the
    candidate's whole sequence scored alone. Needs the SDPA or eager attention
    of the HF model (:data:`polar_xtuner.precision.SCORING_ATTENTION`); flash
    kernels take no such mask.
    """
    attn = getattr(model.config, "attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if attn not in (None, "sdpa", "eager"):
        raise ValueError(f"shared-prefix scoring needs SDPA or eager attention, the model uses {attn!r}")
    device = next(model.parameters()).device
    dtype = next(model.v_head.parameters()).dtype
    backbone = model.llm if hasattr(model, "llm") else model.model
    # A group too long for one row's mask goes in parts, its prefix repeated in each.
    whole, (groups, origin) = groups, scoring_parts(groups, max(row_tokens, MAX_ROW_TOKENS))
    rows = rows_by_length(groups, row_tokens)
    # Batches of up to batch_size rows whose (rows x width^2) masks stay within MASK_ELEMENTS.
    packed_rows = [(r, pack_groups([groups[i] for i in r])) for r in rows]
    batches, batch, width = [], [], 0
    for item in packed_rows:
        w = max(width, len(item[1].input_ids))
        if batch and (len(batch) == batch_size or (len(batch) + 1) * w * w > MASK_ELEMENTS):
            batches.append(batch)
            batch, w = [], len(item[1].input_ids)
        batch.append(item)
        width = w
    if batch:
        batches.append(batch)
    out: list[list[float]] = [[] for _ in groups]
    for packed in tqdm(batches, desc="Scoring", disable=not progress, unit="batch"):
        width = max(len(p.input_ids) for _, p in packed)
        ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(packed), width), dtype=torch.long)
        gid = torch.full((len(packed), width), -1, dtype=torch.int32)  # padding: a group of its own
        mid = torch.zeros((len(packed), width), dtype=torch.int32)
        for b, (_, p) in enumerate(packed):
            n = len(p.input_ids)
            ids[b, :n], pos[b, :n], gid[b, :n], mid[b, :n] = p.input_ids, p.position_ids, p.group_ids, p.member_ids
        allowed = torch.stack([dense_mask(gid[b], mid[b]) for b in range(len(packed))])[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device))[0]
        for b, (members, p) in enumerate(packed):
            spread_scores(model.v_head(hidden[b, p.score_index.to(device)]).squeeze(-1).float().tolist(),
                          members, groups, out)
    scores: list[list[float]] = [[0.0] * len(g.candidates) for g in whole]
    for part_scores, (g, members) in zip(out, origin):
        for k, v in zip(members, part_scores):
            scores[g][k] = v
    return scores


def score_answers(model, tokenizer, records: Sequence[dict], max_length: int = DEFAULT_MAX_LENGTH,
                  max_response_length: int = DEFAULT_MAX_RESPONSE_LENGTH, batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
                  padding_side: str | None = None, progress: bool = False,
                  shared_prefix: bool = False) -> list[list[float]]:
    """Each validated record's answer scores: a pair's chosen and rejected, a group's responses, in order.

    The answers of one record share one prompt cut (the encoder's rule for
    candidates of one item). With ``shared_prefix`` the answers of every record
    with the same prompt and reference are scored after one copy of it
    (:func:`score_groups`); the scores equal the unshared ones up to float
    rounding.
    """
    if not records:
        return []
    enc = PolarEncoder(tokenizer, max_length=max_length, max_response_length=max_response_length,
                       reward_token_id=getattr(model.config, "reward_token_id", None))
    items = [(r["prompt"], r["reference"], record_answers(r)) for r in records]
    wrappers = [r.get("wrapper", "sft") for r in records]
    if shared_prefix:
        groups, where = group_answers(items, wrappers, enc)
        scores = score_groups(model, groups, pad_id(tokenizer), SHARED_ROW_TOKENS, batch_size, progress)
        return [[scores[g][k] for k in ks] for g, ks in where]
    texts = enc.texts(items, wrappers)
    flat = score_ids(model, enc.input_ids([t for per_item in texts for t in per_item]), pad_id(tokenizer),
                     padding_side or tokenizer.padding_side, batch_size, progress)
    out, k = [], 0
    for per_item in texts:
        out.append(flat[k:k + len(per_item)])
        k += len(per_item)
    return out


def score_records(model, tokenizer, records: Sequence[dict], max_length: int = DEFAULT_MAX_LENGTH,
                  max_response_length: int = DEFAULT_MAX_RESPONSE_LENGTH, batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
                  padding_side: str | None = None, progress: bool = False,
                  shared_prefix: bool = False) -> list[tuple[float, float]]:
    """(chosen score, rejected score) for each validated pair record (:func:`score_answers`)."""
    return [(s[0], s[1]) for s in score_answers(model, tokenizer, records, max_length, max_response_length,
                                                batch_size, padding_side, progress, shared_prefix)]
