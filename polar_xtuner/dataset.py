"""The training dataset builder that the configs call.

``build_polar_dataset`` validates every record before tokenizing (a bad record
stops the run with its file, line and field instead of hanging a tokenizer
worker), encodes with :class:`polar_xtuner.encoding.PolarEncoder` (the same
token ids as xtuner's ``build_preference_dataset(is_reference=True)``), and
packs with xtuner's own ``PackedDatasetWrapper`` when varlen attention is on.
Items have the format of ``xtuner.dataset.collate_fns.preference_collate_fn``,
plus each pair's ``margin`` (0 where the record has none; packed rows carry
``margins``, one per pair), which :func:`polar_collate_fn` hands to the model.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm
from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import PackedDatasetWrapper
from xtuner.utils import DEFAULT_PAD_TOKEN_INDEX

from .schema import DataError, load_records

ENCODE_CHUNK = 1000  # records per batched tokenizer call


def _build_tokenizer(tokenizer):
    if isinstance(tokenizer, dict):
        from xtuner.registry import BUILDER

        return BUILDER.build(tokenizer)
    return tokenizer


PAIR_COLUMNS = ("chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels", "margin")


@contextlib.contextmanager
def _no_cyclic_gc():
    """Pause the cyclic garbage collector while millions of id lists are built.

    Reading, encoding and packing allocate only acyclic dicts and lists, which
    reference counting frees; the collector would still rescan all of them at
    every full collection. Restored on exit, even on error.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def encode_columns(records: Sequence[dict], encoder, desc: str = "Encoding pairs") -> dict[str, list]:
    """Encode validated records into columns of pair features (plain lists).

    Batches go through the fast tokenizer, whose Rust thread pool uses the
    machine's cores (no fixed process count).

    Returns:
        ``chosen_ids``, ``rejected_ids``, their labels, ``margin`` (the
        record's, or 0) and ``length`` (tokens of the pair), one entry per
        record.
    """
    columns = {k: [] for k in (*PAIR_COLUMNS, "length")}
    with tqdm(total=len(records), desc=desc, disable=len(records) < 5 * ENCODE_CHUNK) as bar:
        for start in range(0, len(records), ENCODE_CHUNK):
            chunk = records[start:start + ENCODE_CHUNK]
            for rec, feat in zip(chunk, encoder.encode_pairs(chunk)):
                for k, v in feat.items():
                    columns[k].append(v)
                columns["margin"].append(float(rec.get("margin", 0.0)))
                columns["length"].append(len(feat["chosen_ids"]) + len(feat["rejected_ids"]))
            bar.update(len(chunk))
    return columns


def encode_records(records: Sequence[dict], encoder, desc: str = "Encoding pairs"):
    """:func:`encode_columns` as an HF ``datasets.Dataset`` (what the cache stores)."""
    from datasets import Dataset

    return Dataset.from_dict(encode_columns(records, encoder, desc))


def pack_pairs(dataset, max_packed_length: int, shuffle: bool = True, seed: int = 0):
    """Pack pairs into rows of at most max_packed_length tokens.

    The order is shuffled with a fixed seed (every rank packs the same rows),
    then xtuner's ``PackedDatasetWrapper`` fills the rows. A pair longer than
    the limit is an error here: xtuner would drop it with only a log line.

    Args:
        dataset: Encoded pairs, as :func:`encode_columns` columns or an HF
            dataset with the same columns (the cache).
    """
    if isinstance(dataset, dict):
        lengths = np.asarray(dataset["length"])
    else:
        lengths = dataset.with_format("arrow")["length"].to_numpy()
    over = np.flatnonzero(lengths > max_packed_length)
    if len(over):
        raise DataError(
            f"{len(over)} pair(s) are longer than max_packed_length={max_packed_length} tokens "
            f"(longest {lengths.max()}, first at record {over[0] + 1}); "
            "raise max_packed_length to at least 2 x max_length"
        )
    order = np.random.default_rng(seed).permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    return MarginPackedRows(_PairRows(dataset, order.tolist()), max_packed_length, shuffle_before_pack=False)


class MarginPackedRows(PackedDatasetWrapper):
    """xtuner's packed rows, plus ``margins``: the row's pairs' margins in order."""

    def __getitem__(self, index):
        row = super().__getitem__(index)
        row["margins"] = [pair["margin"] for pair in self.data[index]]
        return row


def polar_collate_fn(instances, pad_index: int = DEFAULT_PAD_TOKEN_INDEX, return_hf_format: bool = False,
                     use_varlen_attn: bool = False):
    """xtuner's ``preference_collate_fn``, plus ``margins``: one per pair, in pair order.

    That is the order of the chosen reward tokens the model reads (row by
    row, left to right), whether the pairs are packed or padded.
    """
    out = preference_collate_fn(instances, pad_index=pad_index, return_hf_format=return_hf_format,
                                use_varlen_attn=use_varlen_attn)
    if use_varlen_attn:
        margins = [m for row in instances
                   for m in row.get("margins", [0.0] * ((len(row["cumulative_len"]) - 1) // 2))]
    else:
        margins = [float(pair.get("margin", 0.0)) for pair in instances]
    (out if return_hf_format else out["data"])["margins"] = torch.tensor(margins, dtype=torch.float32)
    return out


class _PairRows:
    """The pairs as dicts in a given order, for PackedDatasetWrapper.

    The wrapper reads every pair once, by index, and keeps it. Freshly encoded
    columns are used as they are; a cached HF dataset is read from Arrow in
    bulk, since indexing it row by row costs ~0.1 ms a row (a fifth of the
    whole build).
    """

    def __init__(self, dataset, order):
        if isinstance(dataset, dict):
            self._columns = {c: dataset[c] for c in PAIR_COLUMNS}
        else:
            # to_pylist over Arrow: datasets' own column objects index row by row
            arrow = dataset.with_format("arrow")
            self._columns = {c: arrow[c].to_pylist() for c in PAIR_COLUMNS}
        self._order = order

    def __len__(self):
        return len(self._order)

    def __getitem__(self, i):
        j = self._order[i]
        return {c: v[j] for c, v in self._columns.items()}


CACHE_FORMAT = 2  # bump when the encoding or the cached columns change


def cache_key(data_files: Sequence[str], tokenizer, max_length: int, max_response_length: int,
              reward_token_id: int | None) -> str:
    """A fingerprint of everything the encoded pairs depend on."""
    h = hashlib.sha1()
    for path in data_files:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else f"{tokenizer.name_or_path}|{len(tokenizer)}").encode())
    h.update(json.dumps([max_length, max_response_length, reward_token_id, CACHE_FORMAT]).encode())
    return h.hexdigest()[:16]


def _barrier():
    from mmengine.dist import barrier, get_world_size

    if get_world_size() > 1:
        barrier()


def encoded_pairs(data_files: list[str], tokenizer, max_length: int, max_response_length: int,
                  reward_token_id: int | None, cache_dir: str | None = None):
    """Encoded pair features, from the cache when it holds this exact input.

    Without a cache every rank validates and encodes, and the columns are
    returned as plain lists (no round trip through Arrow). With one, a hit is
    memory-mapped from disk (no validation, no tokenization); on a miss every
    rank validates (so bad data fails on every rank, never leaving ranks
    waiting), rank 0 encodes and saves atomically, and the others load it.
    """
    from datasets import load_from_disk
    from mmengine.dist import get_rank

    from .encoding import PolarEncoder

    for path in data_files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
    if cache_dir is None:
        encoder = PolarEncoder(tokenizer, max_length, max_response_length, reward_token_id)
        return encode_columns(load_records(data_files), encoder)
    path = os.path.join(cache_dir, cache_key(data_files, tokenizer, max_length, max_response_length,
                                             reward_token_id))
    if os.path.isdir(path):
        print(f"polar_xtuner: using cached encoded pairs {path}", file=sys.stderr)
    else:
        records = load_records(data_files)
        encoder = PolarEncoder(tokenizer, max_length, max_response_length, reward_token_id)
        if get_rank() == 0:
            tmp = f"{path}.tmp{os.getpid()}"
            encode_records(records, encoder).save_to_disk(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)  # atomic: a half-written cache is never read
            print(f"polar_xtuner: cached encoded pairs in {path}", file=sys.stderr)
        del records
    _barrier()
    return load_from_disk(path)


def build_polar_dataset(
    data_files: str | Sequence[str],
    tokenizer,
    max_length: int = 16384,
    max_response_length: int = 4096,
    reward_token_id: int | None = None,
    use_varlen_attn: bool = False,
    max_packed_length: int | None = None,
    shuffle_before_pack: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """Validate, encode and (optionally) pack POLAR preference data.

    Args:
        data_files: One or more .jsonl files of prompt/reference/chosen/rejected.
        tokenizer: A tokenizer or its config dict.
        max_length: Token budget of one sequence.
        max_response_length: Cap for the reference and each candidate.
        reward_token_id: Checked against the tokenizer's ``[UNUSED_TOKEN_130]``.
        use_varlen_attn: Pack pairs into rows (for varlen attention).
        max_packed_length: Row length when packing; default 2 x max_length.
        shuffle_before_pack: Shuffle pairs (with ``seed``) before packing.
        seed: Seed of the packing order; the same on every rank.
        cache_dir: Keep the encoded pairs here (HF datasets on disk,
            memory-mapped) and reuse them on restart and on every rank while
            the files, tokenizer and lengths are unchanged. None: no cache.

    Returns:
        A dataset of pair features, or of packed rows with ``use_varlen_attn``.

    Exits:
        With a one-line message naming file, line and field when the data is
        bad, rather than a traceback from inside the training loop.
    """
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    try:
        with _no_cyclic_gc():
            dataset = encoded_pairs(files, _build_tokenizer(tokenizer), max_length, max_response_length,
                                    reward_token_id, cache_dir)
            if use_varlen_attn:
                dataset = pack_pairs(dataset, max_packed_length or 2 * max_length, shuffle_before_pack, seed)
            elif isinstance(dataset, dict):
                from datasets import Dataset

                dataset = Dataset.from_dict(dataset)
    except (DataError, ValueError) as e:
        # SystemExit prints one clean message and exits non-zero on every rank.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return dataset
