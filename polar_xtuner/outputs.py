"""Writing outputs so that nothing is lost: never over an input, always atomically.

Every tool writes through these helpers:

* :func:`refuse_overlap` stops an output that is, or lies inside, an input
  (or the other way round) before anything is read or written;
* :func:`check_writable` proves a destination takes a file before the
  expensive work starts;
* :func:`atomic_file` and :func:`atomic_dir` write to a temporary sibling and
  rename it into place only when complete, so an interrupted or failed run
  leaves the previous output as it was and nothing complete-looking behind;
* :func:`write_json` writes strict JSON (no bare NaN or Infinity).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import uuid
from typing import Iterable, Iterator, Mapping, Union

from .errors import UserError

Pairs = Union[Mapping[str, Union[str, None]], Iterable[tuple]]

_TMP = ".tmp-"
_OLD = ".old-"


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def refuse_overlap(outputs: Pairs, inputs: Pairs) -> None:
    """Refuse outputs that would write over (or into, or around) an input, or over each other.

    Args:
        outputs: (flag, path) of each output (file or directory), or a
            mapping flag -> path; None paths are skipped.
        inputs: the same for the inputs.

    Raises:
        UserError: naming both flags and paths.
    """
    ins = [(flag, path, _real(path)) for flag, path in _pairs(inputs) if path]
    seen: list[tuple[str, str, str]] = []
    for flag, path in _pairs(outputs):
        if not path:
            continue
        out = _real(path)
        for in_flag, in_path, src in ins:
            if out != src and _inside(out, src):
                raise UserError(f"{flag} {path} is inside the input directory {in_flag} {in_path}, so its "
                                f"outputs would be read back as inputs; choose an output path outside it")
            if _inside(src, out):
                raise UserError(f"{flag} {path} would overwrite an input ({in_flag} {in_path}); "
                                f"choose an output path outside the inputs")
        for o_flag, o_path, other in seen:
            if _inside(out, other) or _inside(other, out):
                raise UserError(f"{flag} {path} and {o_flag} {o_path} would overwrite each other; "
                                f"give them different paths")
        seen.append((flag, path, out))


def _pairs(items: Pairs) -> list[tuple]:
    return list(items.items()) if isinstance(items, Mapping) else list(items)


def check_writable(path: str, flag: str) -> None:
    """Make sure a file can be created beside ``path`` (its parent is created if needed).

    Raises:
        UserError: The parent cannot be created or written (read-only, no
            permission, no space), or ``path`` is a directory.
    """
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory, expected a file path")
    _probe_dir(os.path.dirname(os.path.abspath(path)), flag, path)


def check_writable_dir(path: str, flag: str) -> None:
    """Make sure the directory ``path`` can be created, or replaced, by :func:`atomic_dir`.

    Raises:
        UserError: Its parent cannot be written, or ``path`` is a file.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    _probe_dir(os.path.dirname(_real(path)), flag, path)


def _probe_dir(parent: str, flag: str, path: str) -> None:
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".{_TMP}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"\0")  # a full disk shows up here, not after hours of work
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: not writable ({e.strerror}: {parent}); choose a writable path") from None


def _tmp_sibling(path: str, keep_ext: bool = True) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name) if keep_ext else (name, "")
    # The extension stays last: matplotlib picks a plot's format from it.
    return os.path.join(parent, f".{stem}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary sibling path to write; it replaces ``path`` only if the block succeeds."""
    remove_stale_temps(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj, indent: int = 2) -> None:
    """Strict JSON (NaN and Infinity refused, a ValueError: a bug upstream), written atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _fsync(path: str) -> None:
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(root, name))
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def remove_stale_temps(path: str) -> None:
    """Remove temporary siblings that killed runs left beside ``path`` (their process is gone)."""
    parent, name = os.path.split(os.path.abspath(path))
    stem = os.path.splitext(name)[0]
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        for marker in (_TMP, _OLD):
            prefix = f".{stem}{marker}"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                remove_path(os.path.join(parent, entry))


def remove_path(path: str) -> None:
    """Remove a file, or a directory tree (never following a symlink to one); missing is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (EPERM: it does, another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a fresh temporary sibling directory; it replaces ``path`` whole if the block succeeds.

    The previous directory (and every file in it) is swapped out in one
    atomic rename where Linux allows it (renameat2 RENAME_EXCHANGE), so at
    every instant ``path`` is either the old output or the new complete one;
    elsewhere the swap is two renames. A failure or kill inside the block
    leaves ``path`` untouched.
    """
    path = os.path.abspath(path)
    remove_stale_temps(path)
    tmp = _tmp_sibling(path, keep_ext=False)
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if os.path.isdir(path):
            if _exchange(tmp, path):
                shutil.rmtree(tmp)  # now the old output
            else:
                old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{_OLD}{os.getpid()}")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
