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
import os
import sys
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm
from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import PackedDatasetWrapper
from xtuner.utils import DEFAULT_PAD_TOKEN_INDEX

from polar_xtuner.constants import DEFAULT_MAX_LENGTH, DEFAULT_MAX_RESPONSE_LENGTH, packed_length
from polar_xtuner.data.cache import barrier, cache_key, cached, open_entry
from polar_xtuner.data.shared_prefix import GroupRows, collate_group_row, columns_to_groups, group_records, groups_to_columns
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.errors import ConfigError, UserError, abort_training, renamed_setting
from polar_xtuner.hf_layout import hub_unreachable, refuse_untrusted_code
from polar_xtuner.records import DataError, load_records, require_regular_file

ENCODE_CHUNK = 1000  # records per batched tokenizer call


def build_tokenizer(tokenizer):
    if isinstance(tokenizer, dict):
        from xtuner.registry import BUILDER

        name = tokenizer.get("pretrained_model_name_or_path")
        refuse_untrusted_code(name, "the config's tokenizer")
        try:
            return BUILDER.build(tokenizer)
        except OSError as e:  # a hub name on an offline machine: one line saying what to do
            raise hub_unreachable(name, "the config's tokenizer", e) from None
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
    if instances and "groups" in instances[0]:  # shared_prefix = True: a row of groups
        out = collate_group_row(instances)
        return out["data"] if return_hf_format else out
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


def encoded_pairs(data_files: list[str], tokenizer, max_length: int, max_response_length: int,
                  reward_token_id: int | None, cache_dir: str | None = None, group_tokens: int | None = None):
    """Encoded pair features, from the cache when it holds this exact input.

    Without a cache every rank validates and encodes, and the columns are
    returned as plain lists (no round trip through Arrow). With one, a hit is
    checked against the entry's manifest (sizes and checksums) and
    memory-mapped from disk (no validation, no tokenization); on a miss, or
    a corrupt entry, every rank validates (so bad data fails on every rank,
    never leaving ranks waiting), rank 0 encodes and publishes atomically,
    and the others load it. Separate runs sharing a cache_dir may build one
    entry at the same time: one entry wins, all load it.

    With ``group_tokens`` (shared_prefix = True: the row length) the records
    are encoded as shared-prefix groups (:mod:`polar_xtuner.data.shared_prefix`)
    instead, as :data:`polar_xtuner.data.shared_prefix.GROUP_COLUMNS`, under a cache
    key of their own.
    """
    from mmengine.dist import get_rank, get_world_size

    for path in data_files:
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        # every rank reads the data, and the cache is keyed by its content: a pipe would be split or emptied
        require_regular_file(path, "training reads its data on every rank and keys its cache by the content")

    def encoder():
        return PolarEncoder(tokenizer, max_length, max_response_length, reward_token_id)

    def grouped(records):
        groups, report = group_records(records, encoder(), group_tokens)
        print(f"polar_xtuner: {report.line()}", file=sys.stderr)
        return groups_to_columns(groups)

    if cache_dir is None:
        records = load_records(data_files)
        return encode_columns(records, encoder()) if group_tokens is None else grouped(records)
    layout = "pairs" if group_tokens is None else f"groups:{group_tokens}"
    path = os.path.join(cache_dir, cache_key(data_files, tokenizer, max_length, max_response_length,
                                             reward_token_id, layout))

    def build():
        records = load_records(data_files)
        if group_tokens is None:
            return encode_records(records, encoder())
        from datasets import Dataset

        return Dataset.from_dict(grouped(records))

    if get_world_size() == 1 or get_rank() == 0:
        dataset = cached(path, build)
    else:
        dataset, _, _ = open_entry(path)
        if dataset is None:
            load_records(data_files)  # every rank validates: bad data stops every rank, none waits
        else:
            print(f"polar_xtuner: using cached encoded pairs {path}", file=sys.stderr)
    barrier()
    if dataset is None:  # rank 0 has published the entry
        dataset = cached(path, build, quiet=True)
    return dataset


def build_polar_dataset(
    data_files: str | Sequence[str],
    tokenizer,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_response_length: int = DEFAULT_MAX_RESPONSE_LENGTH,
    reward_token_id: int | None = None,
    use_varlen_attn: bool = False,
    max_packed_length: int | None = None,
    shuffle_before_pack: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
    shared_prefix: bool | None = None,
    share_prefix: bool | None = None,
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
        shared_prefix: Encode each prompt and reference once per row: the
            candidates of the records sharing them form one group
            (:mod:`polar_xtuner.data.shared_prefix`), scored after one copy of their
            prefix. Needs ``use_varlen_attn``. The loss per pair is unchanged.
        share_prefix: The same switch under its earlier name, for configs
            written before it was renamed; giving both with different values
            is refused.

    Returns:
        A dataset of pair features, or of packed rows with ``use_varlen_attn``.

    Exits:
        With a one-line message naming file, line and field when the data is
        bad, rather than a traceback from inside the training loop.
    """
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    try:
        shared_prefix = renamed_setting("shared_prefix", shared_prefix, "share_prefix", share_prefix, False)
        if not isinstance(shared_prefix, bool):
            raise ConfigError(f"shared_prefix must be True or False, got {shared_prefix!r}")
        if shared_prefix and not use_varlen_attn:
            raise ConfigError("shared_prefix = True needs use_varlen_attn = True (groups are packed into rows)")
        with _no_cyclic_gc():
            row = packed_length(max_length, max_packed_length)
            dataset = encoded_pairs(files, build_tokenizer(tokenizer), max_length, max_response_length,
                                    reward_token_id, cache_dir, group_tokens=row if shared_prefix else None)
            if shared_prefix:
                dataset = GroupRows(columns_to_groups(dataset), row, shuffle_before_pack, seed)
            elif use_varlen_attn:
                dataset = pack_pairs(dataset, packed_length(max_length, max_packed_length), shuffle_before_pack, seed)
            elif isinstance(dataset, dict):
                from datasets import Dataset

                dataset = Dataset.from_dict(dataset)
    except ValueError as e:  # DataError and the encoder's setting errors
        # one clean message, and a non-zero exit on every rank
        abort_training(e if isinstance(e, UserError) else UserError(str(e)))
    return dataset
