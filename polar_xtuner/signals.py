"""How a tool's process takes SIGINT and SIGTERM: one interrupt state, and critical sections.

A tool's SIGINT and SIGTERM handlers are installed by
:func:`polar_xtuner.cli.entry.start_tool` (before torch and the other heavy
imports) and by :func:`polar_xtuner.cli.entry.run`. While the tool starts
(nothing written yet) a signal ends it at once; while ``main`` runs it raises :class:`Interrupted`
and is *sticky*: libraries catch it with bare ``except:`` (DeepSpeed's
op-builder probes compile a test program during ``import deepspeed`` and
swallow any exception, a Ctrl-C included), so it is raised again every half
second until it reaches :func:`polar_xtuner.cli.entry.run`. Outputs replaced during the run are kept
aside (:func:`polar_xtuner.outputs.Transaction`) and put back when the run
ends interrupted; the decision, and every swap of an output, happens with
signals deferred, so exit 130/143 always means the old outputs and exit 0
the new ones.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator


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


state = _State()


def exit_code(signum: int) -> int:
    return 128 + signum


def describe(signum: int) -> str:
    return "interrupted (SIGINT)" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def _on_signal(signum, _frame) -> None:
    if state.received is None:
        state.received = signum
    if state.phase == "starting":
        # main() has not started, so nothing was written: stop now, in one line.
        os.write(2, f"error: {describe(signum)} while starting; nothing was written\n".encode())
        os._exit(exit_code(signum))
    if state.phase != "running" or state.deferred or state.deciding:
        return  # finished (the exit code is decided), or inside a swap: acted upon when it ends
    _keep_raising()
    raise Interrupted(state.received)


def _keep_raising() -> None:
    """Raise the interrupt again every half second until run() has it (a library may swallow it)."""
    if state.thread is not None and state.thread.is_alive():
        return
    main_id = threading.main_thread().ident

    def loop():
        while True:
            time.sleep(_REDELIVER_S)
            if state.phase != "running" or state.deciding or state.received is None:
                return
            if not state.deferred:
                signal.pthread_kill(main_id, state.received)

    state.thread = threading.Thread(target=loop, name="polar-interrupt", daemon=True)
    state.thread.start()


def install_handlers() -> Callable[[], None] | None:
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
        if isinstance(args.exc_value, Interrupted) and state.phase == "running":
            return  # raised again by _keep_raising
        hook(args)

    sys.unraisablehook = unraisable

    def restore() -> None:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook

    return restore


def interrupted() -> int | None:
    """The signal received during this run (SIGINT or SIGTERM), or None."""
    return state.received if state.phase == "running" and not state.deciding else None


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` when a signal arrived during this run, even one a library swallowed."""
    if interrupted() is not None:
        raise Interrupted(state.received)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A critical section (an output's swap, a rollback): signals are recorded, and raised when it ends."""
    state.deferred += 1
    try:
        yield
    finally:
        state.deferred -= 1
    if not state.deferred:
        raise_if_interrupted()
