"""Shared-prefix rows: the candidates of one prompt and reference after one copy of what they share.

Every POLAR input is ``prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + candidate``
and the reward token, so the candidates of one record (or of every record with
the same prompt and reference) repeat everything before the candidate. A
*group* holds that prefix once and each candidate's remainder after it:

    row:       [ prefix | candidate 1 | candidate 2 | ... ][ next group ... ]
    positions:   0 .. P-1  P .. P+n1-1  P .. P+n2-1
    attends to:  causal    prefix+own   prefix+own

A candidate's tokens attend causally to its prefix and to themselves, never to
a sibling or another group, and their positions continue from the prefix's
end, so each candidate's hidden states (and its score at its last token, the
reward token) are those of its whole sequence scored alone.

The prefix is the longest common run of token ids of the group's encoded
sequences, cut so that every candidate keeps at least one token. Sharing is
therefore exact whatever the tokenizer does at the prefix/candidate seam:
ids that differ there simply stay with the candidates.

The attention kernels that run such a row in training live in
:mod:`polar_xtuner.train.shared_prefix_attention`; :func:`dense_mask` here is
the row's plain (T, T) mask, which scoring and the tests use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch

from polar_xtuner.encoding import pair_items
from polar_xtuner.records import DataError


def split_prefix(sequences: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """The longest common prefix of sequences, and each one's remainder.

    The prefix stops one token short of the shortest sequence, so every
    remainder keeps at least its last token (the reward token, where the score
    is read).

    Raises:
        ValueError: No sequences, or an empty one.
    """
    if not sequences:
        raise ValueError("a group needs at least one sequence")
    if min(len(s) for s in sequences) == 0:
        raise ValueError("a group's sequences must not be empty")
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    for s in sequences[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return list(first[:n]), [list(s[n:]) for s in sequences]


@dataclass(frozen=True)
class Group:
    """Candidates sharing one prefix, and the ordered pairs among them.

    Attributes:
        prefix: Token ids every candidate's sequence starts with.
        candidates: Each candidate's ids after the prefix (its reward token last).
        pairs: ``(better, worse, margin)``: indices into ``candidates``.
    """

    prefix: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int, float], ...]

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]],
                       pairs: Sequence[tuple[int, int, float]]) -> "Group":
        """A group of whole encoded sequences (each scored alone today) and their pairs."""
        prefix, rest = split_prefix(sequences)
        n = len(sequences)
        for i, j, _ in pairs:
            if not (0 <= i < n and 0 <= j < n) or i == j:
                raise ValueError(f"pair ({i}, {j}) does not name two of the group's {n} candidates")
        return cls(tuple(prefix), tuple(tuple(c) for c in rest), tuple((int(i), int(j), float(m)) for i, j, m in pairs))

    @property
    def tokens(self) -> int:
        """Tokens of the group in a shared-prefix row."""
        return len(self.prefix) + sum(len(c) for c in self.candidates)

    @property
    def unshared_tokens(self) -> int:
        """Tokens of the same pairs packed today: both whole sequences of every pair."""
        p = len(self.prefix)
        return sum(2 * p + len(self.candidates[i]) + len(self.candidates[j]) for i, j, _ in self.pairs)

    def sequence(self, k: int) -> list[int]:
        """Candidate ``k``'s whole sequence, as it is scored alone."""
        return [*self.prefix, *self.candidates[k]]

    def split(self, max_tokens: int) -> list["Group"]:
        """This group in parts of at most ``max_tokens`` each, the prefix repeated in each.

        Every pair lands whole in one part (a candidate may appear in several
        parts), so every pair is still scored within one row; the pairs keep
        their order. A group that fits is returned as it is.

        Raises:
            DataError: One pair alone (prefix and both candidates) is longer
                than ``max_tokens``.
        """
        if self.tokens <= max_tokens:
            return [self]
        parts: list[tuple[list[int], list[tuple[int, int, float]]]] = []
        members: list[int] = []
        part_pairs: list[tuple[int, int, float]] = []
        size = len(self.prefix)
        for i, j, m in self.pairs:
            pair_len = len(self.candidates[i]) + len(self.candidates[j])
            if len(self.prefix) + pair_len > max_tokens:
                raise DataError(f"a pair of {len(self.prefix) + pair_len} tokens (its prefix and both candidates) "
                                f"is longer than max_packed_length={max_tokens}; raise max_packed_length")
            need = sum(len(self.candidates[k]) for k in {i, j} if k not in members)
            if size + need > max_tokens:
                parts.append((members, part_pairs))
                members, part_pairs, size = [], [], len(self.prefix)
                need = pair_len
            for k in (i, j):
                if k not in members:
                    members.append(k)
            part_pairs.append((i, j, m))
            size += need
        if part_pairs:
            parts.append((members, part_pairs))
        out = []
        for members, part_pairs in parts:
            index = {k: n for n, k in enumerate(members)}
            out.append(Group(self.prefix, tuple(self.candidates[k] for k in members),
                             tuple((index[i], index[j], m) for i, j, m in part_pairs)))
        return out


def group_pairs(records: Sequence[dict], encoder, chunk: int = 1000) -> tuple[list[Group], list[tuple[int, int, int]]]:
    """The pairs of validated records as groups of the candidates that share a prefix.

    Records group when their wrapper, prompt, reference and kept prompt length
    (the encoder's truncation rules, unchanged) are equal; a group holds their
    distinct encoded sequences (two equal answers of one record stay two
    candidates) and each record's pair with its margin. The shared prefix is
    then the sequences' longest common run of ids (:func:`split_prefix`), so
    every candidate's ids are exactly the encoder's.

    Returns:
        The groups (whole, in first-seen order), and for each record its
        ``(group, chosen, rejected)`` indices.
    """
    buckets: dict[tuple, int] = {}
    index: list[dict] = []
    seqs: list[list] = []
    pairs: list[list] = []
    where = []
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        items = pair_items(part)
        fields = encoder.encode_fields(items)
        kept = encoder.kept_prompt_lengths(items, fields)
        for rec, feat, n in zip(part, encoder.encode_pairs(part, fields), kept):
            key = (rec.get("wrapper", "sft"), json.dumps(rec["prompt"]), json.dumps(rec["reference"]), n)
            g = buckets.setdefault(key, len(buckets))
            if g == len(index):
                index.append({})
                seqs.append([])
                pairs.append([])
            ij = []
            for c in ("chosen_ids", "rejected_ids"):
                seq = tuple(feat[c])
                if seq not in index[g] or ij == [index[g][seq]]:  # equal answers stay two candidates
                    index[g].setdefault(seq, len(seqs[g]))
                    seqs[g].append(seq)
                    ij.append(len(seqs[g]) - 1)
                else:
                    ij.append(index[g][seq])
            pairs[g].append((ij[0], ij[1], float(rec.get("margin", 0.0))))
            where.append((g, ij[0], ij[1]))
    return [Group.from_sequences(s, p) for s, p in zip(seqs, pairs)], where


def group_answers(items: Sequence[tuple], wrappers: Sequence[str], encoder,
                  chunk: int = 1000) -> tuple[list[Group], list[list[int]]]:
    """The answers of ``(prompt, reference, answers)`` items as groups of the sequences that share a prefix.

    Items group when their wrapper, prompt, reference and kept prompt length
    (the encoder's truncation: an item's answers share one cut) are equal,
    as in :func:`group_pairs`; equal sequences are scored once. For scoring:
    the groups carry no pairs.

    Returns:
        The groups, and for each item the indices of its answers' sequences
        in its group: ``(group, [candidate, ...])``.
    """
    buckets: dict[tuple, int] = {}
    index: list[dict] = []
    where = []
    for start in range(0, len(items), chunk):
        part = list(items[start:start + chunk])
        part_wrappers = list(wrappers[start:start + chunk])
        fields = encoder.encode_fields(part)
        kept = encoder.kept_prompt_lengths(part, fields)
        texts = encoder.texts(part, part_wrappers, fields)
        ids = iter(encoder.input_ids([t for per_item in texts for t in per_item]))
        for (prompt, reference, answers), wrapper, n in zip(part, part_wrappers, kept):
            key = (wrapper, json.dumps(prompt), json.dumps(reference), n)
            g = buckets.setdefault(key, len(buckets))
            if g == len(index):
                index.append({})
            where.append((g, [index[g].setdefault(tuple(next(ids)), len(index[g])) for _ in answers]))
    return [Group.from_sequences(list(seqs), ()) for seqs in index], where


def scoring_parts(groups: Sequence[Group], max_tokens: int) -> tuple[list[Group], list[tuple[int, list[int]]]]:
    """Groups cut into parts of at most ``max_tokens`` (a candidate that alone is longer goes alone), for scoring.

    The prefix is repeated in each part; pairs are not kept.

    Returns:
        The parts, and for each its group and the group's candidates it holds.
    """
    parts, origin = [], []
    for g, group in enumerate(groups):
        members: list[int] = []
        size = len(group.prefix)
        for k, cand in enumerate(group.candidates):
            if members and size + len(cand) > max_tokens:
                parts.append(Group(group.prefix, tuple(group.candidates[m] for m in members), ()))
                origin.append((g, members))
                members, size = [], len(group.prefix)
            members.append(k)
            size += len(cand)
        parts.append(Group(group.prefix, tuple(group.candidates[m] for m in members), ()))
        origin.append((g, members))
    return parts, origin


def fill_rows(groups: Sequence[Group], order: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices of ``groups`` in rows: taken in ``order``, each row filled until the next would not fit.

    A group longer than ``row_tokens`` (or any, with 0) gets a row of its own.
    """
    rows: list[list[int]] = []
    size = 0
    for i in order:
        if not rows or size + groups[i].tokens > row_tokens:
            rows.append([])
            size = 0
        rows[-1].append(i)
        size += groups[i].tokens
    return rows


def rows_by_length(groups: Sequence[Group], row_tokens: int) -> list[list[int]]:
    """:func:`fill_rows` shortest first: the scoring rows (little padding between rows of a batch)."""
    return fill_rows(groups, sorted(range(len(groups)), key=lambda i: groups[i].tokens), row_tokens)


def spread_scores(values: Sequence[float], members: Sequence[int], groups: Sequence[Group],
                  out: list[list[float]]) -> None:
    """A row's candidate scores (:attr:`SharedPrefixRow.score_index` order) into ``out[group]``."""
    k = 0
    for i in members:
        n = len(groups[i].candidates)
        out[i] = list(values[k:k + n])
        k += n


@dataclass
class SharedPrefixRow:
    """One packed row of groups, as tensors.

    Attributes:
        input_ids: (T,) token ids.
        position_ids: (T,) positions: each prefix from 0, each candidate from
            its prefix's length.
        group_ids: (T,) the token's group within the row.
        member_ids: (T,) 0 for a prefix token, k for the k-th candidate (from 1).
        score_index: (C,) the row position of each candidate's last token, in
            group then candidate order.
        pairs: (P, 2) ``(better, worse)`` indices into ``score_index``.
        margins: (P,) each pair's margin.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group_ids: torch.Tensor
    member_ids: torch.Tensor
    score_index: torch.Tensor
    pairs: torch.Tensor
    margins: torch.Tensor

    def to(self, device) -> "SharedPrefixRow":
        return SharedPrefixRow(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def group_bounds(self) -> torch.Tensor:
        """(G+1,) int32 start offsets of the groups, then the row's length."""
        change = torch.nonzero(self.group_ids[1:] != self.group_ids[:-1]).flatten() + 1
        ends = torch.tensor([len(self.group_ids)], device=change.device)
        return torch.cat([torch.zeros(1, dtype=change.dtype, device=change.device), change, ends]).to(torch.int32)


def pack_groups(groups: Sequence[Group]) -> SharedPrefixRow:
    """Lay groups out in one row (:class:`SharedPrefixRow`)."""
    ids, pos, gid, mid, score_index, pairs, margins = [], [], [], [], [], [], []
    for g, group in enumerate(groups):
        p = len(group.prefix)
        ids += group.prefix
        pos += range(p)
        gid += [g] * p
        mid += [0] * p
        first = len(score_index)
        for k, cand in enumerate(group.candidates, start=1):
            ids += cand
            pos += range(p, p + len(cand))
            gid += [g] * len(cand)
            mid += [k] * len(cand)
            score_index.append(len(ids) - 1)
        for i, j, m in group.pairs:
            pairs.append((first + i, first + j))
            margins.append(m)
    return SharedPrefixRow(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        group_ids=torch.tensor(gid, dtype=torch.int32),
        member_ids=torch.tensor(mid, dtype=torch.int32),
        score_index=torch.tensor(score_index, dtype=torch.long),
        pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        margins=torch.tensor(margins, dtype=torch.float32),
    )


def allowed(group_ids: torch.Tensor, member_ids: torch.Tensor, q_idx, kv_idx):
    """Whether query ``q_idx`` may attend to key ``kv_idx`` (broadcasting index tensors)."""
    same_group = group_ids[q_idx] == group_ids[kv_idx]
    visible = (member_ids[kv_idx] == 0) | (member_ids[kv_idx] == member_ids[q_idx])
    return same_group & visible & (kv_idx <= q_idx)


def dense_mask(group_ids: torch.Tensor, member_ids: torch.Tensor) -> torch.Tensor:
    """(T, T) bool: the row's attention mask, True where a query may attend."""
    idx = torch.arange(len(group_ids), device=group_ids.device)
    return allowed(group_ids, member_ids, idx[:, None], idx[None, :])
