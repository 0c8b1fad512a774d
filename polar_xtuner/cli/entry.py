"""How a tool runs: its process set up first, its ``main`` in one wrapper that decides the exit code.

:func:`start_tool` is the first call of every entry point (``tools/*.py``,
the package's ``python -m`` modules); :func:`run`, through
:func:`entry_point` and :func:`cli`, maps what ``main`` raises to one line and
an exit code (the table in :mod:`polar_xtuner.errors`), and puts back the
outputs an interrupted run replaced (:mod:`polar_xtuner.signals`).
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from polar_xtuner import signals
from polar_xtuner.constants import MKL_CBWR
from polar_xtuner.errors import EXIT_USER, PolarError, describe_os_error, message
from polar_xtuner.outputs import Transaction
from polar_xtuner.signals import state


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call a tool's ``main(argv)`` and map what it raises to one line and an exit code.

    A run that a SIGINT or SIGTERM reached ends with 130 or 143, whatever
    else was raised then, and the outputs it replaced are put back.

    Returns:
        The exit code: main's own return value, or the code of the error.
    """
    if state.phase == "running":  # nested (cli over entry_point): the outer run decides
        return int(main(argv) or 0)
    restore = signals.install_handlers()
    state.phase, state.received, state.deciding, state.deferred = "running", None, False, 0
    tx = Transaction()
    try:
        code = _outcome(main, argv)  # returns with signals deferred: what arrives now cannot change it
        signum = state.received
        if signum is None:
            tx.commit()
            return code
        tx.rollback()
        print(f"error: {signals.describe(signum)}; outputs were left as they were", file=sys.stderr)
        return signals.exit_code(signum)
    finally:
        state.phase = "finished"
        tx.close()  # a bug's traceback keeps what was written, as before
        if restore is not None:  # an in-process call (tests): the caller's handlers come back
            restore()
            state.phase = "idle"


def _outcome(main, argv) -> int | None:
    """main's exit code, or its error's (its line printed); None when a signal came.

    Returns with ``deciding`` set: signals arriving from then on are only recorded.
    """
    try:
        try:
            try:
                return int(main(argv) or 0)
            finally:
                state.deciding = True  # the first thing after main: from here signals are only recorded
        except PolarError as e:
            return _report(message(e), e.exit_code)
        except ModuleNotFoundError as e:  # a lazy import in main: the wrong interpreter, not a bug
            if missing_module(e) is None:
                raise
            return _report(missing_module(e), EXIT_USER)
        except OSError as e:
            if describe_os_error(e) is None and state.received is None:
                raise
            return _report(message(e), EXIT_USER)
    except KeyboardInterrupt:
        state.deciding = True
        if state.received is None:  # raised without a signal (a test, a library): Ctrl-C's code
            state.received = signal.SIGINT
        return None
    except BaseException:
        state.deciding = True
        if state.received is None:
            raise  # a bug keeps its traceback
        return None  # raised because of the signal (a library wrapping the interrupt)


def _report(line: str, code: int) -> int:
    if state.received is None:  # an interrupted run reports the interrupt instead
        print(line, file=sys.stderr)
    return code


def entry_point(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorate a tool's ``main(argv)`` so that calling it returns the exit code :func:`run` gives."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run(main, argv)

    return wrapped


def cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """``sys.exit(run(main))``: the last line of every tool, which then ends without a last collection."""
    code = run(main)
    ignore_late_signals()
    end_without_collection()
    sys.exit(code)


def ignore_late_signals() -> None:
    """From here the outputs are final and the exit code decided: SIGINT and SIGTERM are ignored.

    Interpreter shutdown puts the default handlers back; a SIGTERM then (a
    job scheduler's, after a conversion had swapped its model in) ended the
    process with 143, which says "outputs left as they were", silently. An
    ignored signal is not reset by the shutdown, so the exit code stays the run's.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def end_without_collection() -> None:
    """Spare the interpreter's shutdown its garbage collection over the whole heap.

    Called where the process only ends from here on: its outputs are written
    and closed. torch, transformers and DeepSpeed leave millions of objects,
    and walking them at exit took 0.6-1.9 s of CPU per process on 2 cores
    (``import torch`` to ``xtuner.tools.train``; 0.2 s frozen, measured).
    Frozen objects are still freed by reference counting; cyclic garbage is
    left unfinalized to the operating system, which is safe only here, where
    nothing the process wrote is pending (logging flushes in its own exit
    handler).
    """
    gc.freeze()


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


class _MissingModuleHook:
    """A ``sys.excepthook`` for a missing module raised while the tool imports, before ``main`` runs."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, kind, value, tb):
        line = missing_module(value)
        if line is None:
            return self.previous(kind, value, tb)
        print(line, file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_USER)  # nothing was written yet: the import failed before main


def start_tool() -> None:
    """Set up a tool's process: the first call of every entry point, before its heavy imports.

    Entry points are ``tools/*.py`` and the package's ``python -m`` modules;
    importing the package sets nothing up by itself. From here on a
    missing third-party module is one line and exit 2 (the interpreter is not
    the project's), a Ctrl-C or SIGTERM is honoured even during the seconds
    torch takes to import, and CPU maths is bit-reproducible
    (``MKL_CBWR``, :data:`polar_xtuner.constants.MKL_CBWR`; a value the user
    set is kept).
    """
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    if not isinstance(sys.excepthook, _MissingModuleHook):
        sys.excepthook = _MissingModuleHook(sys.excepthook)
    if signals.install_handlers() is not None:
        state.phase = "starting"
