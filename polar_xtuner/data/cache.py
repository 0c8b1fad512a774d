"""The on-disk cache of encoded pairs: one entry per exact input, published whole, shared by ranks and runs.

An entry is ``cache_dir/<key>`` (:func:`cache_key`: the data files' content,
the tokenizer's files, settings and library versions, the lengths); its manifest (:data:`CACHE_MANIFEST`, written
last) lists every file's size and checksum, so a hit is checked, a torn or
corrupt entry is rebuilt, and separate runs that build one entry at once
agree on the one that is published (:func:`cached`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import sys
from typing import Sequence

from polar_xtuner.hf_layout import file_digest
from polar_xtuner.outputs import pid_alive, remove_path
from polar_xtuner.records import DataError

CACHE_FORMAT = 2  # bump when the encoding or the cached columns change
CACHE_MANIFEST = "polar_cache.json"  # inside each entry, written last: the entry is whole
MANIFEST_VERSION = 1
_PUBLISH_ATTEMPTS = 5
# A cache entry is cache_dir/<key>; its siblings <key>.tmp-<host>-<pid>-<hex> are
# entries being written, <key>.corrupt-<host>-<pid>-<hex> entries being deleted.
_SIBLING = re.compile(r"[0-9a-f]{16}\.(?:tmp|corrupt)-(?P<host>.*)-(?P<pid>\d+)-[0-9a-f]+")
_OLD_TMP = re.compile(r"[0-9a-f]{16}\.tmp(?P<pid>\d+)")  # before the manifest: <key>.tmp<pid>


def cache_key(data_files: Sequence[str], tokenizer, max_length: int, max_response_length: int,
              reward_token_id: int | None, layout: str = "pairs") -> str:
    """A fingerprint of everything the encoded pairs (or groups: ``layout``) depend on.

    The data files count by their content (blake2b, about 1.2 GB/s), not by
    size and modification time: an edit that keeps both (same length, mtime
    restored, or within the file system's timestamp resolution) must not
    return the old token ids.
    """
    h = hashlib.sha1()
    for path in data_files:
        h.update(f"{os.path.getsize(path)}|{file_digest(path, digest_size=16)}\n".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps([max_length, max_response_length, reward_token_id, CACHE_FORMAT]).encode())
    if layout != "pairs":  # shared-prefix groups (and their row length); pair entries keep their keys
        h.update(layout.encode())
    return h.hexdigest()[:16]


# Files of a tokenizer directory that can change the ids (tokenization_*.py, its code, too).
_TOKENIZER_FILES = re.compile(r"tokenizer\.(json|model)|tokenizer_config\.json|special_tokens_map\.json"
                              r"|added_tokens\.json|vocab\.\w+|merges\.txt|tokenization_\w+\.py|\w+\.tiktoken")
# Settings that name a file or shape a batch, not how text becomes ids: left out, so a moved
# tokenizer, or one loaded with another padding side, still hits.
_NOT_IDS = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "special_tokens_map_file",
            "added_tokens_file", "auto_map", "trust_remote_code", "padding_side", "truncation_side",
            "model_input_names", "_commit_hash"}


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about a tokenizer that can change the ids it gives, as one string.

    The fast tokenizer's whole state (vocabulary, merges, normalizer, added
    tokens), the settings it was built with (``tokenizer_config.json`` and any
    given in code: ``clean_up_tokenization_spaces``, ``add_bos_token`` ...),
    the content of every tokenizer file in its directory (a slow tokenizer's
    ``tokenizer.model``, its code), and the transformers and tokenizers
    versions, whose decoders and normalizers change between releases.
    """
    import tokenizers
    import transformers

    parts = [f"transformers {transformers.__version__}", f"tokenizers {tokenizers.__version__}",
             type(tokenizer).__name__, str(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _NOT_IDS}
    parts.append(json.dumps(settings, sort_keys=True, default=str))
    folder = getattr(tokenizer, "name_or_path", None)
    if folder and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if _TOKENIZER_FILES.fullmatch(name):
                parts.append(f"{name}|{file_digest(os.path.join(folder, name), digest_size=16)}")
    return "\n".join(parts)


def barrier():
    from mmengine.dist import barrier, get_world_size

    if get_world_size() > 1:
        barrier()


def _entry_files(entry: str) -> list[str]:
    """The entry's files (relative paths, sorted), its manifest excluded."""
    names = []
    for root, _, files in os.walk(entry):
        names += [os.path.relpath(os.path.join(root, f), entry) for f in files]
    return sorted(n for n in names if n != CACHE_MANIFEST)


def _write_manifest(entry: str, rows: int) -> None:
    """Record every file's size and checksum in the entry: the last write before it is published."""
    files = {name: {"size": os.path.getsize(os.path.join(entry, name)),
                    "blake2b": file_digest(os.path.join(entry, name), digest_size=16)}
             for name in _entry_files(entry)}
    manifest = {"polar_cache": MANIFEST_VERSION, "format": CACHE_FORMAT, "rows": rows, "files": files}
    with open(os.path.join(entry, CACHE_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def _check_manifest(entry: str) -> tuple[str | None, int]:
    """(why the entry cannot be trusted, or None; its row count).

    Every listed file's size and checksum is checked on every hit (files the
    manifest does not list, such as datasets' own cache files, are ignored).
    Sizes alone would catch a truncated file, not a same-size corruption, and
    checksumming costs little next to the rest of a run. Measured on 2 cores,
    a 20k-pair demo entry (26 MiB): the check 21 ms (blake2b, 1.2 GB/s on one
    core; ~0.85 s per GiB), the load without it 3 ms, the hit with varlen
    packing 340 ms, encoding instead of the hit 5.3 s. A hit that is not
    packed only memory-maps, so there the check is most of the time, but it
    reads the entry once, as the first epoch would anyway.
    """
    try:
        with open(os.path.join(entry, CACHE_MANIFEST), "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"no {CACHE_MANIFEST} (written by an older polar_xtuner, or damaged)", 0
    except (OSError, ValueError) as e:
        return f"unreadable {CACHE_MANIFEST}: {_one_line(e)}", 0
    try:
        version, fmt, rows, files = (manifest["polar_cache"], manifest["format"], int(manifest["rows"]),
                                     dict(manifest["files"]))
        listed = [(name, int(v["size"]), str(v["blake2b"])) for name, v in files.items()]
        for name, _, _ in listed:
            if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
                raise ValueError(f"{name!r} is outside the entry")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"malformed {CACHE_MANIFEST}: {_one_line(e)}", 0
    if version != MANIFEST_VERSION or fmt != CACHE_FORMAT:
        return f"{CACHE_MANIFEST} of another version ({version}, format {fmt})", 0
    if not listed:
        return f"{CACHE_MANIFEST} lists no files", 0
    for name, size, _ in listed:  # sizes first: a truncated file is found without reading anything
        try:
            actual = os.path.getsize(os.path.join(entry, name))
        except OSError as e:
            return f"{name}: {e.strerror or _one_line(e)}", 0
        if actual != size:
            return f"{name} is {actual} bytes, its manifest says {size}", 0
    for name, _, digest in listed:
        try:
            if file_digest(os.path.join(entry, name), digest_size=16) != digest:
                return f"{name} does not match its checksum", 0
        except OSError as e:
            return f"{name}: {e.strerror or _one_line(e)}", 0
    return None, rows


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _identity(path: str):
    """(device, inode) of path, or None when it is gone: tells one entry from its replacement."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_VANISHED = "vanished"  # the entry was moved or replaced while being read: look again


def open_entry(path: str):
    """(dataset, None, ident) for a whole entry; (None, None, None) when there is none;
    (None, why, ident) when it is corrupt; (None, _VANISHED, None) when it changed while read."""
    from datasets import load_from_disk

    ident = _identity(path)
    if ident is None:
        return None, None, None
    if not os.path.isdir(path):
        return None, "not a directory", ident
    why, rows = _check_manifest(path)
    dataset = None
    if why is None:
        try:
            dataset = load_from_disk(path)
        except Exception as e:  # a damaged entry can fail inside pyarrow with any error
            why = f"cannot be loaded: {type(e).__name__}: {_one_line(e)}"
        else:
            if len(dataset) != rows:
                why, dataset = f"holds {len(dataset)} rows, its manifest says {rows}", None
    if why is not None and _identity(path) != ident:
        return None, _VANISHED, None  # another process moved it aside or replaced it meanwhile
    return dataset, why, ident


def _owner() -> str:
    """Where this process's pid means something: the host, and its pid namespace (containers)."""
    try:
        return f"{socket.gethostname()}~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _sibling(path: str, kind: str) -> str:
    return f"{path}.{kind}-{_owner()}-{os.getpid()}-{secrets.token_hex(4)}"


def _remove_stale_siblings(cache_dir: str) -> None:
    """Remove temp and half-deleted entries left by killed builders here (never a live one's).

    Only names from this host and pid namespace are judged: elsewhere the
    same pid is another process.
    """
    host = _owner()
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for name in names:
        m = _SIBLING.fullmatch(name) or _OLD_TMP.fullmatch(name)
        if m is None or m.groupdict().get("host", host) != host:  # another node's pid says nothing here
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not pid_alive(pid):
            remove_path(os.path.join(cache_dir, name))


def _move_aside(path: str, ident) -> None:
    """Take the corrupt entry ``ident`` off ``path`` and delete it.

    Renamed first, so no reader ever sees a half-deleted entry. When another
    process replaced the entry since it was judged, the rename took the new
    one: it goes back (if ``path`` is free again), and is never deleted while
    it is the one in place.
    """
    aside = _sibling(path, "corrupt")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process moved it already
    except OSError as e:
        raise DataError(f"cache entry {path} is corrupt and cannot be moved aside ({e.strerror}); "
                        f"delete it by hand, or set cache_dir to a directory you can write") from None
    if _identity(aside) != ident:
        with contextlib.suppress(OSError):
            os.rename(aside, path)
            return
    remove_path(aside)


def _write_error(cache_dir: str, e: OSError) -> DataError:
    return DataError(f"cannot write the data cache in {cache_dir} ({e.strerror or _one_line(e)}): "
                     f"free some space, make it writable, or set cache_dir to another directory "
                     f"(None: no cache)")


def _publish(dataset, path: str):
    """Write ``dataset`` beside ``path`` and rename it into place.

    Returns:
        The published entry's identity, or None when another builder was first.

    The rename of a whole directory is atomic and never replaces an entry
    that is there (on POSIX it fails with ENOTEMPTY or EEXIST): the entry in
    place, which another process may be reading, is left as it is.
    """
    cache_dir = os.path.dirname(path) or "."
    _remove_stale_siblings(cache_dir)
    tmp = _sibling(path, "tmp")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise _write_error(cache_dir, e) from None
    try:
        try:
            dataset.save_to_disk(tmp)
            _write_manifest(tmp, len(dataset))
            ident = _identity(tmp)  # a rename keeps it
            os.rename(tmp, path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(tmp):
                return None  # another builder's entry is in place: use it
            if e.errno == errno.ENOENT and os.path.isdir(cache_dir) and not os.path.lexists(tmp):
                return None  # our temp was taken away under us: look again
            raise _write_error(cache_dir, e) from None
        return ident
    finally:
        if os.path.lexists(tmp):
            remove_path(tmp)


def cached(path: str, build, quiet: bool = False):
    """The dataset at cache entry ``path``; built (``build()``) and published when missing or corrupt.

    Any number of processes may run this at once for one entry: each either
    loads a whole entry or publishes its own, and none deletes an entry
    that others may be reading unless it is corrupt.
    """
    from datasets import load_from_disk

    built = None
    for _ in range(_PUBLISH_ATTEMPTS):
        dataset, why, ident = open_entry(path)
        if dataset is not None:
            if not quiet:
                print(f"polar_xtuner: using cached encoded pairs {path}", file=sys.stderr)
            return dataset
        if why == _VANISHED:
            continue
        if why is not None:
            print(f"polar_xtuner: cache entry {path} is corrupt ({why}); rebuilding", file=sys.stderr)
            _move_aside(path, ident)
        if built is None:
            built = build()
        ident = _publish(built, path)
        if ident is not None:
            print(f"polar_xtuner: cached encoded pairs in {path}", file=sys.stderr)
            try:
                return load_from_disk(path)
            except Exception:
                if _identity(path) == ident:
                    raise  # our own entry, in place and unreadable: not a race
        # else another builder published first (or took ours): load theirs
    raise DataError(f"cache entry {path} kept changing while this process read it ({_PUBLISH_ATTEMPTS} tries); "
                    f"another process may be deleting it: stop it, or set cache_dir to another directory")
