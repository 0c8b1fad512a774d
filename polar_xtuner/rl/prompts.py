"""RL prompts from POLAR records: verl parquet rows and OpenRLHF jsonl lines.

Each input record needs a ``prompt`` and a ``reference`` (``chosen`` and
``rejected`` are not used: in RL the policy writes the candidates). A verl row:

.. code-block:: python

    {"data_source": "polar", "prompt": [messages], "ability": "general",
     "reward_model": {"style": "polar", "ground_truth": [reference messages]},
     "extra_info": {"prompt": [messages], "ability": "general", "split": "train", "index": 0}}

An OpenRLHF line: ``{"prompt": [messages], "label": "<JSON of {prompt, reference}>"}``,
for ``--data.input_key prompt --data.label_key label --data.apply_chat_template``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from polar_xtuner.errors import UserError
from polar_xtuner.outputs import atomic_file
from polar_xtuner.records import RecordError, iter_records, normalise_field

FORMATS = ("verl", "openrlhf")


def plain_messages(field: list[dict]) -> list[dict]:
    # role and content only: one Arrow schema for every row
    return [{"role": str(m.get("role", "user")), "content": m["content"]} for m in field]


def rl_rows(paths: Iterable[str], fmt: str = "verl", data_source: str = "polar", ability: str = "general",
            split: str = "train") -> tuple[list[dict], list[str]]:
    """Rows for an RL framework, and the rejected lines ("file:line: reason").

    Raises:
        DataError: A file is missing or unreadable.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows, rejected = [], []
    for path in paths:
        for item in iter_records(path, validate=False):
            if item.error is not None:
                rejected.append(f"{item.where}: {item.error.reason}")
                continue
            rec = item.record
            try:
                if not isinstance(rec, dict):
                    raise RecordError(f"record must be a JSON object, got {type(rec).__name__}")
                missing = [k for k in ("prompt", "reference") if k not in rec]
                if missing:
                    raise RecordError(f"missing field '{missing[0]}'", missing[0])
                prompt = plain_messages(normalise_field("prompt", rec["prompt"]))
                reference = plain_messages(normalise_field("reference", rec["reference"]))
            except RecordError as e:
                rejected.append(f"{item.where}: {e.reason}")
                continue
            if fmt == "verl":
                rows.append({
                    "data_source": data_source,
                    "prompt": prompt,
                    "ability": ability,
                    "reward_model": {"style": "polar", "ground_truth": reference},
                    "extra_info": {"prompt": prompt, "ability": ability, "split": split, "index": len(rows)},
                })
            else:
                rows.append({"prompt": prompt,
                             "label": json.dumps({"prompt": prompt, "reference": reference}, ensure_ascii=False)})
    return rows, rejected


def write_rows(rows: list[dict], out: str, fmt: str) -> None:
    """Write rows as parquet (verl) or jsonl (OpenRLHF), atomically: a temporary sibling, then renamed.

    Raises:
        UserError: The folder of ``out`` does not exist (it is not created: see polar_xtuner.outputs).
    """
    with atomic_file(out) as tmp:
        if fmt == "verl":
            import datasets

            datasets.Dataset.from_list(rows).to_parquet(tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")



# The file each format is: the extension decides, so a name never lies about its content.
EXTENSIONS = {".parquet": "verl", ".jsonl": "openrlhf"}


def output_format(out: str, requested: str | None) -> str:
    """The format --out's extension names; a --format that contradicts it is refused.

    Raises:
        UserError: An unknown extension, or a --format another than the extension's.
    """
    ext = os.path.splitext(out)[1].lower()
    named = EXTENSIONS.get(ext)
    if named is None:
        raise UserError(f"--out {out}: the extension must be .parquet (verl) or .jsonl (openrlhf), "
                        f"got {ext or 'none'}")
    if requested is not None and requested != named:
        want = next(e for e, f in EXTENSIONS.items() if f == requested)
        raise UserError(f"--format {requested} writes {want}, but --out {out} names a {ext} file; "
                        f"name the output *{want}, or drop --format")
    return named


__all__ = ["EXTENSIONS", "FORMATS", "output_format", "rl_rows", "write_rows"]
