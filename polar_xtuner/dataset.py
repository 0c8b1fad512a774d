"""The training dataset builder that the configs call.

``build_polar_dataset`` validates every record before tokenizing (a bad record
stops the run with its file, line and field instead of hanging a tokenizer
worker), encodes with :class:`polar_xtuner.encoding.PolarEncoder` (the same
token ids as xtuner's ``build_preference_dataset(is_reference=True)``), and
packs with xtuner's own ``PackedDatasetWrapper`` when varlen attention is on.
Items have the format of ``xtuner.dataset.collate_fns.preference_collate_fn``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .schema import DataError, load_records

ENCODE_CHUNK = 1000  # records per batched tokenizer call


def _build_tokenizer(tokenizer):
    if isinstance(tokenizer, dict):
        from xtuner.registry import BUILDER

        return BUILDER.build(tokenizer)
    return tokenizer


def encode_records(records: Sequence[dict], encoder, desc: str = "Encoding pairs"):
    """Encode validated records into an HF ``datasets.Dataset`` of pair features."""
    from datasets import Dataset

    columns = {k: [] for k in ("chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels")}
    with tqdm(total=len(records), desc=desc, disable=len(records) < 5 * ENCODE_CHUNK) as bar:
        for start in range(0, len(records), ENCODE_CHUNK):
            chunk = records[start:start + ENCODE_CHUNK]
            for feat in encoder.encode_pairs(chunk):
                for k, v in feat.items():
                    columns[k].append(v)
            bar.update(len(chunk))
    return Dataset.from_dict(columns)


def pack_pairs(dataset, max_packed_length: int, shuffle: bool = True, seed: int = 0):
    """Pack pairs into rows of at most max_packed_length tokens.

    The order is shuffled with a fixed seed (every rank packs the same rows),
    then xtuner's ``PackedDatasetWrapper`` fills the rows. A pair longer than
    the limit is an error here: xtuner would drop it with only a log line.
    """
    from torch.utils.data import Subset
    from xtuner.dataset.preference_dataset import PackedDatasetWrapper

    lengths = np.array([len(c) + len(r) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"])])
    over = np.flatnonzero(lengths > max_packed_length)
    if len(over):
        raise DataError(
            f"{len(over)} pair(s) are longer than max_packed_length={max_packed_length} tokens "
            f"(longest {lengths.max()}, first at record {over[0] + 1}); "
            "raise max_packed_length to at least 2 x max_length"
        )
    order = np.random.default_rng(seed).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    return PackedDatasetWrapper(Subset(dataset, order.tolist()), max_packed_length, shuffle_before_pack=False)


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

    Returns:
        A dataset of pair features, or of packed rows with ``use_varlen_attn``.

    Exits:
        With a one-line message naming file, line and field when the data is
        bad, rather than a traceback from inside the training loop.
    """
    from .encoding import PolarEncoder

    try:
        records = load_records(data_files)
        encoder = PolarEncoder(
            _build_tokenizer(tokenizer), max_length=max_length,
            max_response_length=max_response_length, reward_token_id=reward_token_id,
        )
        dataset = encode_records(records, encoder)
        if use_varlen_attn:
            dataset = pack_pairs(dataset, max_packed_length or 2 * max_length, shuffle_before_pack, seed)
    except (DataError, ValueError) as e:
        # SystemExit prints one clean message and exits non-zero on every rank.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return dataset
