"""The project's error policy: typed errors in the library, exit codes in one CLI wrapper.

Library code raises; only :func:`run` (every tool's entry point) and
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

Interrupts. A tool's SIGINT and SIGTERM handlers are installed when this
module is imported by one of the tools (before torch and the other heavy
imports) and by :func:`run`. While the tool starts (nothing written yet) a
signal ends it at once; while ``main`` runs it raises :class:`Interrupted`
and is *sticky*: libraries catch it with bare ``except:`` (DeepSpeed's
op-builder probes compile a test program during ``import deepspeed`` and
swallow any exception, a Ctrl-C included), so it is raised again every half
second until it reaches :func:`run`. Outputs replaced during the run are kept
aside (:func:`polar_xtuner.outputs.Transaction`) and put back when the run
ends interrupted; the decision, and every swap of an output, happens with
signals deferred, so exit 130/143 always means the old outputs and exit 0
the new ones.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a running tool (a KeyboardInterrupt, so ``except Exception`` lets it pass)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_REDELIVER_S = 0.5


class _State:
    """The interrupt state of this process (one tool run at a time, on the main thread)."""

    phase = "idle"  # idle (not ours) | starting | running | finished
    received: int | None = None  # the first signal of the run: sticky until run() ends
    deciding = False  # main() has ended: signals are only recorded now
    deferred = 0  # >0: a critical section runs; signals are only recorded
    thread: threading.Thread | None = None  # re-raises a swallowed interrupt


_state = _State()


def _exit_code(signum: int) -> int:
    return 128 + signum


def _what(signum: int) -> str:
    return "interrupted (SIGINT)" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def _on_signal(signum, _frame) -> None:
    if _state.received is None:
        _state.received = signum
    if _state.phase == "starting":
        # main() has not started, so nothing was written: stop now, in one line.
        os.write(2, f"error: {_what(signum)} while starting; nothing was written\n".encode())
        os._exit(_exit_code(signum))
    if _state.phase != "running" or _state.deferred or _state.deciding:
        return  # finished (the exit code is decided), or inside a swap: acted upon when it ends
    _keep_raising()
    raise Interrupted(_state.received)


def _keep_raising() -> None:
    """Raise the interrupt again every half second until run() has it (a library may swallow it)."""
    if _state.thread is not None and _state.thread.is_alive():
        return
    main_id = threading.main_thread().ident

    def loop():
        while True:
            time.sleep(_REDELIVER_S)
            if _state.phase != "running" or _state.deciding or _state.received is None:
                return
            if not _state.deferred:
                signal.pthread_kill(main_id, _state.received)

    _state.thread = threading.Thread(target=loop, name="polar-interrupt", daemon=True)
    _state.thread.start()


def _install() -> Callable[[], None] | None:
    """Install our handlers; a function that puts the previous ones back, or None where ours are in place already.

    Besides SIGINT and SIGTERM: Python reports an exception raised where it
    cannot propagate (a weakref callback during an import) as "Exception
    ignored" with a traceback; an interrupt there is raised again anyway,
    so the report is left out.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if all(signal.getsignal(s) is _on_signal for s in _SIGNALS):
        return None
    handlers = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    hook = sys.unraisablehook

    def unraisable(args):
        if isinstance(args.exc_value, Interrupted) and _state.phase == "running":
            return  # raised again by _keep_raising
        hook(args)

    sys.unraisablehook = unraisable

    def restore() -> None:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook

    return restore


def _started_as_tool() -> bool:
    """This process runs one of the project's tools (tools/*.py, or ``python -m polar_xtuner.X``)."""
    main = sys.argv[0] if sys.argv else ""
    if not main.endswith(".py"):
        return False
    package = os.path.dirname(os.path.realpath(__file__))
    where = os.path.dirname(os.path.realpath(main))
    return where in (package, os.path.join(os.path.dirname(package), "tools"))


def interrupted() -> int | None:
    """The signal received during this run (SIGINT or SIGTERM), or None."""
    return _state.received if _state.phase == "running" and not _state.deciding else None


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` when a signal arrived during this run, even one a library swallowed."""
    if interrupted() is not None:
        raise Interrupted(_state.received)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A critical section (an output's swap, a rollback): signals are recorded, and raised when it ends."""
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if not _state.deferred:
        raise_if_interrupted()


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call a tool's ``main(argv)`` and map what it raises to one line and an exit code.

    A run that a SIGINT or SIGTERM reached ends with 130 or 143, whatever
    else was raised then, and the outputs it replaced are put back.

    Returns:
        The exit code: main's own return value, or the code of the error.
    """
    if _state.phase == "running":  # nested (cli over entry_point): the outer run decides
        return int(main(argv) or 0)
    from .outputs import Transaction

    restore = _install()
    _state.phase, _state.received, _state.deciding, _state.deferred = "running", None, False, 0
    tx = Transaction()
    try:
        code = _outcome(main, argv)  # returns with signals deferred: what arrives now cannot change it
        signum = _state.received
        if signum is None:
            tx.commit()
            return code
        tx.rollback()
        print(f"error: {_what(signum)}; outputs were left as they were", file=sys.stderr)
        return _exit_code(signum)
    finally:
        _state.phase = "finished"
        tx.close()  # a bug's traceback keeps what was written, as before
        if restore is not None:  # an in-process call (tests): the caller's handlers come back
            restore()
            _state.phase = "idle"


def _outcome(main, argv) -> int | None:
    """main's exit code, or its error's (its line printed); None when a signal came.

    Returns with ``deciding`` set: signals arriving from then on are only recorded.
    """
    try:
        try:
            try:
                return int(main(argv) or 0)
            finally:
                _state.deciding = True  # the first thing after main: from here signals are only recorded
        except PolarError as e:
            return _report(message(e), e.exit_code)
        except ModuleNotFoundError as e:  # a lazy import in main: the wrong interpreter, not a bug
            if missing_module(e) is None:
                raise
            return _report(missing_module(e), EXIT_USER)
        except OSError as e:
            if describe_os_error(e) is None and _state.received is None:
                raise
            return _report(message(e), EXIT_USER)
    except KeyboardInterrupt:
        _state.deciding = True
        if _state.received is None:  # raised without a signal (a test, a library): Ctrl-C's code
            _state.received = signal.SIGINT
        return None
    except BaseException:
        _state.deciding = True
        if _state.received is None:
            raise  # a bug keeps its traceback
        return None  # raised because of the signal (a library wrapping the interrupt)


def _report(line: str, code: int) -> int:
    if _state.received is None:  # an interrupted run reports the interrupt instead
        print(line, file=sys.stderr)
    return code


def entry_point(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorate a tool's ``main(argv)`` so that calling it returns the exit code :func:`run` gives."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run(main, argv)

    return wrapped


def cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """``sys.exit(run(main))``: the last line of every tool."""
    sys.exit(run(main))


def abort_training(e: PolarError) -> None:
    """Inside ``xtuner train``: one line on stderr and the error's exit code, on every rank.

    xtuner's CLI is not ours, so this is the one place library code exits.
    """
    print(message(e), file=sys.stderr)
    raise SystemExit(e.exit_code) from None


def missing_module(e: BaseException) -> str | None:
    """The one line for a third-party module this interpreter lacks, or None for anything else.

    A tool started with another interpreter than the project's (``python``
    from outside the venv) fails importing torch or xtuner: that is the
    environment, exit 2, not a bug's traceback.
    """
    name = getattr(e, "name", None) or ""
    if not isinstance(e, ModuleNotFoundError) or not name or name.split(".")[0] == __package__:
        return None
    tool = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "this tool"
    return (f"error: {sys.executable} has no module {name!r}, which {tool} needs: run it with the project's "
            f"environment (make setup, then .venv/bin/python or `source .venv/bin/activate`; the .sh tools "
            f"take PYTHON=...)")


def _environment_hook(previous):
    """A ``sys.excepthook`` for a missing module raised while the tool imports, before ``main`` runs."""

    def hook(kind, value, tb):
        line = missing_module(value)
        if line is None:
            return previous(kind, value, tb)
        print(line, file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_USER)  # nothing was written yet: the import failed before main

    return hook


if _started_as_tool():
    sys.excepthook = _environment_hook(sys.excepthook)
if _started_as_tool() and _install() is not None:
    # A tool's process: handle a Ctrl-C or SIGTERM from the first import on (torch takes seconds).
    _state.phase = "starting"
