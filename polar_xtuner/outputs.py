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

Rules every writer follows:

* the folder an output goes into must exist (a missing one is refused in one
  line naming it, exit 2): a mistyped path never creates a tree of folders;
* an output path that is a symbolic link is written through: the file or
  directory it points to is replaced atomically and the link is kept;
* what is written has the modes the user's umask gives new files, even where
  a writer made it through a private temporary file (safetensors writes
  0600 files);
* inside :func:`polar_xtuner.cli.entry.run` (every tool), an output replaced
  during the run is kept aside until the run ends, and put back when a
  SIGINT or SIGTERM ends it (:class:`Transaction`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import uuid
from typing import Iterable, Iterator, Mapping, Union

from polar_xtuner.errors import UserError
from polar_xtuner.signals import deferred_signals, raise_if_interrupted

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
    """Make sure a file can be created at ``path``: its folder exists and takes a file.

    Raises:
        UserError: The folder is missing or cannot be written (read-only, no
            permission, no space), or ``path`` is a directory.
    """
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory, expected a file path")
    _probe_dir(os.path.dirname(output_target(path)), flag, path)


def refuse_foreign(out_dir: str, flag: str, ours, error=UserError) -> None:
    """Refuse to replace a directory that holds anything the tool would not have written.

    Every tool that replaces a directory whole (``--force``, ``-o``) asks this
    first, so a user's other files are never deleted with an earlier output.

    Args:
        out_dir: The directory about to be replaced (nothing happens if it does not exist).
        flag: The flag or argument that named it, for the message.
        ours: ``ours(name)`` is True for an entry the tool writes.
        error: The error class to raise (a :class:`UserError`).

    Raises:
        ``error``: naming the directory and up to five of the other entries.
    """
    if not os.path.isdir(out_dir):
        return
    foreign = sorted(n for n in os.listdir(out_dir) if not ours(n))
    if foreign:
        raise error(f"{flag} {out_dir} holds files this tool did not write ({', '.join(foreign[:5])}"
                    f"{' ...' if len(foreign) > 5 else ''}), which replacing it would delete; "
                    "choose a new or empty directory")


def refuse_replacing(out_dir: str, flag: str, force: bool, ours, error=UserError) -> None:
    """Check a directory a tool replaces whole: empty, or ``force`` and only the tool's own files in it.

    Raises:
        ``error``: Not empty without ``force`` (the message names ``--force``), or
            holding files the tool did not write (:func:`refuse_foreign`).
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise error(f"{flag} {out_dir} is not empty; pass --force to replace it whole")
    refuse_foreign(out_dir, flag, ours, error)  # --force replaces the tool's output, nothing else


def require_extension(path: str, flag: str, allowed: dict[str, str]) -> str:
    """Refuse an output whose extension does not name what is written to it.

    Args:
        path: The output path as given.
        flag: The flag that named it, for the message.
        allowed: Each accepted extension (lower case, with its dot) and what it holds.

    Returns:
        The extension, lower case.

    Raises:
        UserError: naming the flag and the extensions it takes.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in allowed:
        takes = " or ".join(f"{e} ({what})" for e, what in allowed.items())
        got = f"the extension {ext}" if ext else "no extension"
        raise UserError(f"{flag} {path}: {got}; this output is written as {takes}, so name it so")
    return ext


def check_writable_dir(path: str, flag: str) -> None:
    """Make sure the directory ``path`` can be created, or replaced, by :func:`atomic_dir`.

    Raises:
        UserError: Its parent is missing or cannot be written, or ``path`` is a file.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    _probe_dir(os.path.dirname(output_target(path)), flag, path)


def output_target(path: str) -> str:
    """The absolute path an output at ``path`` is written to: a symbolic link's target, else ``path``."""
    path = os.path.abspath(path)
    return os.path.realpath(path) if os.path.islink(path) else path


def require_parent(path: str, flag: str | None = None) -> None:
    """Refuse an output whose folder does not exist (folders are not created on the way).

    Raises:
        UserError: naming the missing folder.
    """
    parent = os.path.dirname(output_target(path))
    if not os.path.isdir(parent):
        what = f"{flag} {path}" if flag else path
        raise UserError(f"{what}: the folder {parent} does not exist; create it first, or write elsewhere")


def _probe_dir(parent: str, flag: str, path: str) -> None:
    require_parent(path, flag)
    # The probe is the output's own temporary sibling, the longest name a run writes for it
    # (the final name, the sibling, the kept-aside copy: all as long or shorter): a name the
    # file system cannot hold fails here, before the work and before any other output appears.
    probe = _tmp_sibling(os.path.join(parent, os.path.basename(output_target(path))))
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")  # a full disk shows up here, not after hours of work
        os.remove(probe)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            name = os.path.basename(probe)
            raise UserError(f"{flag} {path}: the name is too long for this file system (its temporary sibling "
                            f"{name!r} takes {len(name.encode())} bytes, over the limit of "
                            f"{_name_max(parent)}); choose a shorter name") from None
        raise UserError(f"{flag} {path}: not writable ({e.strerror}: {parent}); choose a writable path") from None


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _tmp_sibling(path: str, keep_ext: bool = True, marker: str = _TMP) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name) if keep_ext else (name, "")
    # The extension stays last: matplotlib picks a plot's format from it.
    return os.path.join(parent, f".{stem}{marker}{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary sibling path to write; it replaces ``path`` only if the block succeeds.

    A symbolic link at ``path`` is written through (its target is replaced).

    Raises:
        UserError: The folder of ``path`` does not exist.
    """
    path = _prepared(path)
    with _swapped_in(_tmp_sibling(path), path, is_dir=False) as tmp:
        yield tmp


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
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    # Files keep their extension last (.r.tmp-PID-x.json), directories keep their whole name.
    prefixes = {f".{stem}{marker}" for stem in {os.path.splitext(name)[0], name} for marker in (_TMP, _OLD)}
    for entry in entries:
        for prefix in prefixes:
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                remove_path(os.path.join(parent, entry))
            break


def remove_path(path: str) -> None:
    """Remove a file, or a directory tree (never following a symlink to one); missing is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def pid_alive(pid: int, group: bool = False) -> bool:
    """Whether a process with this pid (``group``: any process of this process group) exists here.

    EPERM counts as alive: the process exists, another user's.
    """
    try:
        (os.killpg if group else os.kill)(pid, 0)
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
    leaves ``path`` untouched. A symbolic link at ``path`` is written through.

    Raises:
        UserError: The folder of ``path`` does not exist.
    """
    path = _prepared(path)
    tmp = _tmp_sibling(path, keep_ext=False)
    os.mkdir(tmp)
    with _swapped_in(tmp, path, is_dir=True):
        yield tmp


def _prepared(path: str) -> str:
    """The path an output is written at (through a link), its parent checked and stale temporaries gone."""
    require_parent(path)
    path = output_target(path)
    remove_stale_temps(path)
    return path


@contextlib.contextmanager
def _swapped_in(tmp: str, path: str, is_dir: bool):
    """Yield ``tmp``; once the body is done, give it the umask's modes, flush it and put it at ``path``.

    Whatever happens, ``tmp`` is gone afterwards (the output, or nothing).
    """
    try:
        yield tmp
        _apply_umask(tmp)
        _fsync(tmp)
        _swap_in(tmp, path, is_dir=is_dir)
    finally:
        with deferred_signals():  # cleaning up is not cut short by a second signal
            if os.path.lexists(tmp):
                remove_path(tmp)


def _swap_in(tmp: str, path: str, is_dir: bool) -> None:
    """Put ``tmp`` at ``path``; the old output is deleted, or kept aside while a :class:`Transaction` is open.

    Runs with signals deferred: a signal that arrived before it replaces
    nothing, one that arrives during it is raised when the swap is complete
    (and the transaction puts the old output back).
    """
    with deferred_signals():
        raise_if_interrupted()
        tx = Transaction.current
        old = None
        if is_dir and os.path.isdir(path):
            if _exchange(tmp, path):
                old = tmp  # now the old output
            else:
                old = _tmp_sibling(path, keep_ext=False, marker=_OLD)
                os.rename(path, old)
                os.rename(tmp, path)
        elif is_dir:
            os.rename(tmp, path)
        else:
            if tx is not None and os.path.lexists(path):
                old = _tmp_sibling(path, marker=_OLD)
                _keep_aside(path, old)
            os.replace(tmp, path)
        if tx is None:
            if old is not None:
                remove_path(old)
            return
        if old is not None and old == tmp:
            kept = _tmp_sibling(path, keep_ext=False, marker=_OLD)
            os.rename(old, kept)
            old = kept
        tx.replaced.append((path, old, is_dir))


def _keep_aside(path: str, backup: str) -> None:
    """A second name for the old file (a hard link; a copy where links are not allowed)."""
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)


class Transaction:
    """The outputs one tool run replaced, so that an interrupted run can put the old ones back.

    :func:`polar_xtuner.cli.entry.run` opens one around ``main``: while it is
    open, :func:`atomic_file` and :func:`atomic_dir` keep each replaced
    output aside (``.NAME.old-PID-*``, removed by the next run if this one is
    killed) instead of deleting it. :meth:`commit` deletes them;
    :meth:`rollback` puts them back, newest first, and removes outputs that
    did not exist before.
    """

    current: "Transaction | None" = None

    def __init__(self) -> None:
        self.replaced: list[tuple[str, str | None, bool]] = []  # (path, old output kept aside or None, is_dir)
        self._outer = Transaction.current
        Transaction.current = self

    def commit(self) -> None:
        """Keep the new outputs: delete the old ones."""
        with deferred_signals():
            for _, old, _ in self.replaced:
                if old is not None:
                    remove_path(old)
            self.replaced.clear()

    def rollback(self) -> None:
        """Put every replaced output back as it was before the run."""
        with deferred_signals():
            for path, old, is_dir in reversed(self.replaced):
                if old is None:  # there was none before
                    remove_path(path)
                elif not is_dir:
                    os.replace(old, path)
                elif _exchange(old, path):
                    remove_path(old)  # now the new output
                else:
                    trash = _tmp_sibling(path, keep_ext=False, marker=_OLD)
                    os.rename(path, trash)
                    os.rename(old, path)
                    remove_path(trash)
            self.replaced.clear()

    def close(self) -> None:
        """End the transaction; what was not rolled back stays (a bug's traceback keeps the new outputs)."""
        self.commit()
        if Transaction.current is self:
            Transaction.current = self._outer


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it back)
    os.umask(mask)
    return mask


def _apply_umask(path: str) -> None:
    """Give ``path`` (a file, or a tree) the modes the user's umask gives new files.

    Some writers go through a private temporary file (safetensors' writer
    leaves 0600 files), so a converted model would be unreadable to the
    group while every other file is not.
    """
    mask = _umask()

    def fix(p: str, full: int) -> None:
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode):
            return
        if stat.S_ISREG(mode) and not mode & 0o111:
            full = 0o666
        os.chmod(p, full & ~mask)

    fix(path, 0o777)
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                fix(os.path.join(root, name), 0o777)
