"""Shared-prefix training data: the pairs of one prompt and reference as one group, groups packed into rows.

With ``shared_prefix = True`` (a config's PART 1) the builder gathers the
distinct candidates of every record with the same prompt, reference, wrapper
and prompt cut (the truncation rules of :class:`polar_xtuner.encoding.PolarEncoder`,
unchanged) into a :class:`polar_xtuner.encoding.shared_prefix.Group`, with the
record's pairs (and margins) between them. A ranked record's pairs and a
policies prompt's pairs share their prompt and reference, so they group the
same way. A group longer than a row is split with its prefix repeated, every
pair whole in one part; nothing is dropped.

Rows hold whole groups (first fit in a seeded order, the same on every rank);
:func:`polar_xtuner.data.dataset.polar_collate_fn` turns a row into what
``PolarRewardModel`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from polar_xtuner.encoding.shared_prefix import Group, fill_rows, group_pairs, pack_groups
from polar_xtuner.records import DataError

GROUP_COLUMNS = ("prefix", "candidates", "pair_better", "pair_worse", "pair_margin")


@dataclass(frozen=True)
class GroupReport:
    """What sharing prefixes did to a data set (logged by the builder and the training run).

    Attributes:
        records: Pairs read.
        groups: Groups after splitting the ones longer than a row.
        candidates: Candidates encoded (a candidate in several split parts counts each time).
        pairs: Pairs kept: always ``records``.
        shared_tokens: Tokens packed with prefixes shared.
        unshared_tokens: Tokens the same pairs pack without sharing (two whole sequences each).
    """

    records: int
    groups: int
    candidates: int
    pairs: int
    shared_tokens: int
    unshared_tokens: int

    @property
    def token_ratio(self) -> float:
        return self.unshared_tokens / max(self.shared_tokens, 1)

    def line(self) -> str:
        return (f"shared prefixes: {self.pairs} pairs in {self.groups} groups of {self.candidates} candidates; "
                f"{self.unshared_tokens} tokens unshared -> {self.shared_tokens} shared "
                f"({self.token_ratio:.2f}x fewer)")


def group_records(records: Sequence[dict], encoder, max_tokens: int) -> tuple[list[Group], GroupReport]:
    """Encode validated records as shared-prefix groups of at most ``max_tokens`` each.

    Args:
        records: Validated pair records (prompt, reference, chosen, rejected,
            optional margin and wrapper).
        encoder: The :class:`polar_xtuner.encoding.PolarEncoder` of the run.
        max_tokens: Row length; longer groups are split (:meth:`Group.split`).

    Returns:
        The groups in first-seen order, and the report.

    Raises:
        DataError: One pair alone (its prefix and both candidates) does not fit a row.
    """
    whole, _ = group_pairs(records, encoder)
    groups = []
    for group in whole:
        groups += group.split(max_tokens)
    report = GroupReport(records=len(records), groups=len(groups), candidates=sum(len(g.candidates) for g in groups),
                         pairs=sum(len(g.pairs) for g in groups), shared_tokens=sum(g.tokens for g in groups),
                         unshared_tokens=sum(g.unshared_tokens for g in whole))
    return groups, report


def groups_to_columns(groups: Sequence[Group]) -> dict[str, list]:
    """Groups as columns (what the data cache stores)."""
    return {
        "prefix": [list(g.prefix) for g in groups],
        "candidates": [[list(c) for c in g.candidates] for g in groups],
        "pair_better": [[i for i, _, _ in g.pairs] for g in groups],
        "pair_worse": [[j for _, j, _ in g.pairs] for g in groups],
        "pair_margin": [[m for _, _, m in g.pairs] for g in groups],
    }


def columns_to_groups(columns) -> list[Group]:
    """:func:`groups_to_columns` back into groups (plain lists, or a cached HF dataset)."""
    if not isinstance(columns, dict):
        arrow = columns.with_format("arrow")
        columns = {c: arrow[c].to_pylist() for c in GROUP_COLUMNS}
    return [Group(tuple(p), tuple(tuple(c) for c in cs), tuple(zip(bs, ws, ms)))
            for p, cs, bs, ws, ms in zip(*(columns[c] for c in GROUP_COLUMNS))]


class GroupRows(torch.utils.data.Dataset):
    """Rows of whole groups, each at most ``max_packed_length`` tokens.

    Groups are taken in a seeded order (the same on every rank) and each row
    is filled until the next group would not fit, as xtuner packs pairs.
    """

    def __init__(self, groups: Sequence[Group], max_packed_length: int, shuffle: bool = True, seed: int = 0):
        over = [g.tokens for g in groups if g.tokens > max_packed_length]
        if over:
            raise DataError(f"{len(over)} group(s) are longer than max_packed_length={max_packed_length} "
                            f"(longest {max(over)}); split them first (Group.split)")
        order = np.random.default_rng(seed).permutation(len(groups)) if shuffle else np.arange(len(groups))
        self.rows = [[groups[i] for i in row] for row in fill_rows(groups, order.tolist(), max_packed_length)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"groups": self.rows[index]}


def collate_group_row(instances) -> dict:
    """One row of groups as the model's input: ids, positions, the layout, and xtuner's varlen keys.

    xtuner's ``VarlenAttnArgsToMessageHubHook`` pops ``cumulative_len`` and
    ``max_seqlen`` (here the groups' bounds); ``PolarRewardModel`` reads
    ``shared_prefix``. ``labels`` only give the row's length to the log.
    """
    if len(instances) != 1:
        raise ValueError(f"shared-prefix rows take a batch size of 1 (one packed row per step), got {len(instances)}")
    row = pack_groups(instances[0]["groups"])
    bounds = row.group_bounds()
    data = {
        "input_ids": row.input_ids[None],
        "position_ids": row.position_ids[None],
        "labels": torch.full((1, len(row.input_ids)), -100, dtype=torch.long),
        "cumulative_len": [bounds],
        "max_seqlen": int((bounds[1:] - bounds[:-1]).max()),
        "shared_prefix": row,
    }
    return {"data": data, "data_samples": None}
