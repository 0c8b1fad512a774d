"""The project's error policy: typed errors in the library; exit codes in the entry points.

Library code raises; only :func:`polar_xtuner.cli.entry.run` (every tool's entry point) and
:func:`abort_training` (inside ``xtuner train``, whose CLI is not ours) turn
an error into a message and an exit code:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     done
2     a user mistake or an environment fault (:class:`UserError`, and a full
      disk, read-only or missing path met while writing): fix the input, flag
      or machine and run again
3     the result cannot be trusted (:class:`VerificationError`): a converted
      model that does not score like its checkpoint, a server or model that
      answered something that is not a finite score
130   interrupted (SIGINT, Ctrl-C); outputs are left as they were
143   terminated (SIGTERM); outputs are left as they were
====  ==========================================================================

Anything else is a bug and keeps its traceback. Every message is one line:
``error: <what>, <where: file/line/field/flag>, <what to do>``.
"""

from __future__ import annotations

import errno
import sys

EXIT_OK = 0
EXIT_USER = 2
EXIT_VERIFY = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class PolarError(Exception):
    """Base of the errors a tool reports as one line; ``exit_code`` picks the code."""

    exit_code = EXIT_USER


class UserError(PolarError, ValueError):
    """A user mistake or environment fault: bad path, flag, data, config or machine. Exit 2."""


class ConfigError(UserError):
    """A setting cannot work on this machine or with this model.

    Inside the training loop it is reported by :func:`abort_training`;
    called directly, it is an ordinary ValueError.
    """


class VerificationError(PolarError):
    """A result failed its check (conversion round trip, non-finite scores). Exit 3."""

    exit_code = EXIT_VERIFY


# OSErrors that are the machine's state, not a bug: reported as one line, exit 2.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EROFS: "read-only file system; write to another path",
    errno.EACCES: "permission denied; write to a path you own",
    errno.EPERM: "operation not permitted; write to a path you own",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory, expected a file",
}


def describe_os_error(e: OSError) -> str | None:
    """One line for an environment OSError (None when it is not one of them)."""
    hint = _ENVIRONMENT_ERRNOS.get(e.errno)
    if hint is None:
        return None
    where = e.filename if e.filename is not None else "(no path)"
    return f"{where}: {hint}"


def message(e: BaseException) -> str:
    """The ``error: ...`` line for an error :func:`run` handles."""
    text = describe_os_error(e) if isinstance(e, OSError) and not isinstance(e, PolarError) else str(e)
    return f"error: {text}"


def abort_training(e: PolarError) -> None:
    """Inside ``xtuner train``: one line on stderr and the error's exit code, on every rank.

    xtuner's CLI is not ours, so this is the one place library code exits.
    """
    print(message(e), file=sys.stderr)
    raise SystemExit(e.exit_code) from None


def renamed_setting(name: str, value, old_name: str, old_value, default=None):
    """The value of a config setting that also answers to an earlier name (None: that name not given).

    Raises:
        ConfigError: Both names given, with different values.
    """
    if old_value is None:
        return default if value is None else value
    if value is not None and value != old_value:
        raise ConfigError(f"{old_name} = {old_value!r} and {name} = {value!r} disagree; {old_name} is {name}'s "
                          f"earlier name: set {name} only")
    return old_value
