"""The one POLAR input encoding, shared by training, evaluation and serving.

POLAR scores a candidate against a reference. For a prompt ``p``, reference
``r`` and candidate ``c`` the model reads::

    p + "\\n" + r + "<|reward|>" + p + "\\n" + c

followed by the reward token ``[UNUSED_TOKEN_130]``, and the score is the value
head's output there. Before the text is built:

* each field's message contents are joined with "\\n" (a string is kept);
* ``r`` and ``c`` are encoded with special tokens and cut to
  ``max_response_length`` tokens (``cut_side="right"`` keeps the head, as in
  xtuner training and POLAR's ``reward_func.py``; xtuner's ``RewardModelClient``
  defaults to ``"left"``);
* the prompt keeps its last ``budget`` tokens, where
  ``budget = (max_length - 4 - len(r) - max(len(c))) // 2`` over the candidates
  scored together (so chosen and rejected share one prompt, as in training);
* each part is decoded with ``skip_special_tokens=True``.

Where xtuner differs, the rules here are the defined behaviour:

* Empty part: the "\\n" is dropped before an empty reference or candidate (as
  in xtuner training; POLAR's client tests ``len(x) == ""``, which is never
  true, and keeps it). The ``pretrain`` wrapper never adds the "\\n".
* ``budget <= 0``: the prompt is dropped. xtuner computes ``ids[-budget:]``,
  which keeps the *whole* prompt at 0 and drops the prompt's *head* below 0,
  both making the text longer than ``max_length``. With the published settings
  (16384 / 4096) the budget is never below 4094, so the two agree there.

Training appends the reward token *id* to the encoded text; serving appends the
token *string* and tokenizes the whole. Both give the same ids with POLAR's
tokenizer, where the reward token is an atomic special token.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from polar_xtuner.constants import (
    CHOSEN_LABEL,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_RESPONSE_LENGTH,
    IGNORE_INDEX,
    REJECTED_LABEL,
    REWARD_SEP,
    REWARD_TOKEN,
    TEMPLATE_RESERVED_TOKENS,
)
from polar_xtuner.encoding.windows import encode_kept
from polar_xtuner.records import join_contents, read_settings

# Written by the converter next to config.json: the lengths the model was
# trained with travel with it, so evaluation and serving clients truncate as
# training did.
ENCODING_FILE = "polar_encoding.json"


@dataclass(frozen=True)
class EncodingSettings:
    """The encoding lengths a POLAR model was trained with.

    Args:
        max_length: Token budget of one sequence, reward token included.
        max_response_length: Cap for the reference and each candidate.
        reward_token_id: Id of ``[UNUSED_TOKEN_130]`` (None: look it up).
        source: Where the values came from (a file path, or "defaults").
    """

    max_length: int = DEFAULT_MAX_LENGTH
    max_response_length: int = DEFAULT_MAX_RESPONSE_LENGTH
    reward_token_id: int | None = None
    source: str = "defaults"

    def save(self, model_dir: str) -> str:
        """Write the settings into a model directory; return the file's path."""
        path = os.path.join(model_dir, ENCODING_FILE)
        data = {k: v for k, v in asdict(self).items() if k != "source"}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_model_dir(cls, model_dir: str | None) -> "EncodingSettings":
        """The settings saved in a model directory, or POLAR's defaults without the file.

        Raises:
            ValueError: The file exists but is not a JSON object of positive
                integer lengths (a model dir that would truncate wrongly).
        """
        path = os.path.join(model_dir, ENCODING_FILE) if model_dir else None
        if path is None or not os.path.isfile(path):
            return cls()
        try:
            data = read_settings(path)
        except ValueError as e:
            raise ValueError(f"{path}: unreadable encoding settings ({e})") from None
        kw = {}
        for key in ("max_length", "max_response_length", "reward_token_id"):
            value = data.get(key)
            if value is None and key == "reward_token_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{path}: field {key!r} must be a positive integer, got {value!r}")
            kw[key] = value
        return cls(**kw, source=path)

    def override(self, max_length: int | None = None, max_response_length: int | None = None) -> "EncodingSettings":
        """These settings with the lengths a caller asked for explicitly."""
        if max_length is None and max_response_length is None:
            return self
        return EncodingSettings(
            max_length if max_length is not None else self.max_length,
            max_response_length if max_response_length is not None else self.max_response_length,
            self.reward_token_id,
            f"{self.source} + explicit lengths",
        )


def resolve_reward_token_id(tokenizer, reward_token_id: int | None = None) -> int:
    """Return the reward token id, checking it against the tokenizer.

    Args:
        tokenizer: A HF tokenizer with ``[UNUSED_TOKEN_130]`` in its vocabulary.
        reward_token_id: The id a config asks for, or None to look it up.

    Raises:
        ValueError: The tokenizer lacks the token, or the config's id names a
            different token (a config/tokenizer mismatch would train on the
            wrong position silently).
    """
    tid = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no reward token {REWARD_TOKEN!r}")
    if reward_token_id is not None and reward_token_id != tid:
        raise ValueError(
            f"reward_token_id={reward_token_id} but the tokenizer maps {REWARD_TOKEN!r} to {tid}; "
            f"set reward_token_id = {tid} in the config"
        )
    return tid


@dataclass
class PolarEncoder:
    """Builds POLAR's input text and token ids from records.

    Args:
        tokenizer: The model's tokenizer (BOS added on encode).
        max_length: Token budget of one sequence, reward token included.
        max_response_length: Cap for the reference and each candidate.
        reward_token_id: Checked against the tokenizer; None looks it up.
        cut_side: "right" keeps the head of an over-long response (training's
            rule), "left" keeps its tail (POLAR client's default).
    """

    tokenizer: Any
    max_length: int = DEFAULT_MAX_LENGTH
    max_response_length: int = DEFAULT_MAX_RESPONSE_LENGTH
    reward_token_id: int | None = None
    cut_side: str = "right"

    def __post_init__(self):
        if self.cut_side not in ("left", "right"):
            raise ValueError(f"cut_side must be 'left' or 'right', got {self.cut_side!r}")
        if self.max_length <= TEMPLATE_RESERVED_TOKENS:
            raise ValueError(f"max_length must be > {TEMPLATE_RESERVED_TOKENS}, got {self.max_length}")
        if self.max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {self.max_response_length}")
        self.reward_token_id = resolve_reward_token_id(self.tokenizer, self.reward_token_id)
        # A fast tokenizer's Rust backend batches across threads; calling it
        # directly skips per-call Python overhead and gives the same ids/text
        # as tokenizer.encode / tokenizer.decode (which xtuner and POLAR use).
        self._backend = getattr(self.tokenizer, "_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        self._longest = None  # see _longest_token
        # BPE groups a periodic stretch from its start (leftmost first), so a
        # kept head is safe from cuts inside one ("Huge fields", 3.).
        self._head_anchored = self._backend is not None and type(self._backend.model).__name__ == "BPE"

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            # encode_batch_fast (tokenizers >= 0.20) skips character offsets we never read
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=True)]
        return [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]

    def _decode(self, ids_batch: list[list[int]]) -> list[str]:
        # The tokenizer's own clean_up_tokenization_spaces default applies, as
        # in xtuner's tokenize_ref and POLAR's client.
        if self._backend is not None:
            texts = self._backend.decode_batch(ids_batch, skip_special_tokens=True)
            if self.tokenizer.clean_up_tokenization_spaces:
                texts = [self.tokenizer.clean_up_tokenization(t) for t in texts]
            return texts
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in ids_batch]

    def _cut(self, ids: list[int]) -> list[int]:
        n = self.max_response_length
        if len(ids) <= n:
            return ids
        return ids[:n] if self.cut_side == "right" else ids[-n:]

    def encode_fields(self, items: Sequence[tuple[Any, Any, Sequence[Any]]]):
        """Token ids (BOS included, not yet cut) of every prompt, reference and candidate.

        A field too long to matter whole (far more text than truncation can
        keep) is tokenized in windows at its kept end instead: its entry is then
        a :class:`polar_xtuner.encoding.windows.ClippedIds`, the verified ids nearest the kept end, more than
        truncation keeps, so cutting it gives the ids the whole text would.

        Returns:
            ``(prompt_ids, reference_ids, candidate_ids)``, the candidates of
            all items in one flat list, in order.
        """
        # The prompt keeps its tail; the budget is at most this, as lengths are >= 0.
        prompt_keep = max(self.max_length - TEMPLATE_RESERVED_TOKENS, 0) // 2
        response_tail = self.cut_side == "left"
        p_ids = self._encode_kept([join_contents(p) for p, _, _ in items], prompt_keep, True)
        r_ids = self._encode_kept([join_contents(r) for _, r, _ in items], self.max_response_length,
                                  response_tail)
        c_ids = self._encode_kept([join_contents(c) for _, _, cs in items for c in cs],
                                  self.max_response_length, response_tail)
        return p_ids, r_ids, c_ids

    def _encode_kept(self, texts: list[str], keep: int, tail: bool) -> list[list[int]]:
        """Ids of texts of which at most ``keep`` tokens (the last ones if ``tail``) are used.

        Long texts are tokenized in windows at their kept end
        (:func:`polar_xtuner.encoding.windows.encode_kept`).
        """
        return encode_kept(self._encode, texts, keep, tail, self._longest_token, self._head_anchored)

    def _longest_token(self) -> int:
        """Characters of the longest vocabulary entry: no token covers more of a text."""
        if self._longest is None:
            self._longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        return self._longest

    def prompt_budget(self, reference_len: int, longest_candidate_len: int) -> int:
        """Prompt tokens kept, from cut lengths; at most 0 means the prompt is dropped."""
        return (self.max_length - TEMPLATE_RESERVED_TOKENS - reference_len - longest_candidate_len) // 2

    def kept_prompt_lengths(self, items: Sequence[tuple[Any, Any, Sequence[Any]]], fields) -> list[int]:
        """Prompt tokens each item keeps: its budget from the cut reference and the item's longest cut candidate.

        ``fields`` is :meth:`encode_fields` of the items. The candidates of one
        item share the cut, so they share the whole text before the answer.
        """
        p_ids, r_ids, c_ids = fields
        cap = self.max_response_length  # a cut field's length, without cutting it
        kept, k = [], 0
        for i, (_, _, cs) in enumerate(items):
            longest = min(max(len(c_ids[k + j]) for j in range(len(cs))), cap)
            k += len(cs)
            budget = self.prompt_budget(min(len(r_ids[i]), cap), longest)
            kept.append(min(len(p_ids[i]), max(budget, 0)))
        return kept

    def texts(
        self,
        items: Sequence[tuple[Any, Any, Sequence[Any]]],
        wrappers: Sequence[str] | None = None,
        fields=None,
    ) -> list[list[str]]:
        """Build the texts (without the reward token) for many items at once.

        Args:
            items: ``(prompt, reference, candidates)`` per item; each field a
                message list or a string. Candidates of one item share the
                prompt budget.
            wrappers: "sft" (default) or "pretrain" per item.
            fields: :meth:`encode_fields` of the same items, if already computed.

        Returns:
            For each item, one text per candidate.
        """
        fields = fields if fields is not None else self.encode_fields(items)
        p_ids, r_ids, c_ids = fields
        r_ids = [self._cut(x) for x in r_ids]
        c_ids = [self._cut(x) for x in c_ids]
        # the prompt keeps its tail
        cut_prompts = [ids[len(ids) - n:] if n else [] for ids, n in zip(p_ids, self.kept_prompt_lengths(items, fields))]

        p_txt = self._decode(cut_prompts)
        r_txt = self._decode(r_ids)
        c_txt = self._decode(c_ids)

        out, k = [], 0
        for i, (_, _, cs) in enumerate(items):
            pretrain = wrappers is not None and wrappers[i] == "pretrain"
            ref_part = _join(p_txt[i], r_txt[i], pretrain)
            texts = []
            for _ in cs:
                texts.append(ref_part + REWARD_SEP + _join(p_txt[i], c_txt[k], pretrain))
                k += 1
            out.append(texts)
        return out

    def serving_texts(self, items, wrappers=None) -> list[str]:
        """Texts for a served POLAR model: the reward token string appended."""
        return [t + REWARD_TOKEN for texts in self.texts(items, wrappers) for t in texts]

    def serving_inputs(self, items, server_type: str, wrappers=None) -> list:
        """What a server of ``server_type`` is sent for these items, one entry per candidate.

        vLLM gets token ids, training's exact ids with the reward token's id
        last, so the server tokenizes nothing; sglang and lmdeploy get the
        text with the reward token string last, which their tokenizers turn
        into the same ids.
        """
        texts = [t for per_item in self.texts(items, wrappers) for t in per_item]
        if server_type == "vllm":
            return self.input_ids(texts)
        return [t + REWARD_TOKEN for t in texts]

    def input_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of built texts, reward token id appended (training's way)."""
        return [ids + [self.reward_token_id] for ids in self._encode(texts)]

    def encode_pairs(self, records: Sequence[dict], fields=None) -> list[dict]:
        """Training features for validated records.

        ``fields`` may pass :meth:`encode_fields` of the records' pair items.

        Returns:
            Per record: ``chosen_ids``, ``rejected_ids`` and their labels
            (0 / 1 at the reward token, -100 elsewhere), the format of
            xtuner's preference datasets.
        """
        wrappers = [r.get("wrapper", "sft") for r in records]
        texts = self.texts(pair_items(records), wrappers, fields)
        ids = self.input_ids([t for pair in texts for t in pair])
        out = []
        for i in range(len(records)):
            chosen, rejected = ids[2 * i], ids[2 * i + 1]
            out.append({
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "chosen_labels": [IGNORE_INDEX] * (len(chosen) - 1) + [CHOSEN_LABEL],
                "rejected_labels": [IGNORE_INDEX] * (len(rejected) - 1) + [REJECTED_LABEL],
            })
        return out


def pair_items(records: Sequence[dict]) -> list[tuple]:
    """``(prompt, reference, (chosen, rejected))`` items of records."""
    return [(r["prompt"], r["reference"], (r["chosen"], r["rejected"])) for r in records]


def _join(prompt: str, part: str, pretrain: bool) -> str:
    if pretrain or part == "":
        return prompt + part
    return prompt + "\n" + part
