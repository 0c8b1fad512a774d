"""Command-line flags that are checked before any work starts.

Every tool builds its parser with :class:`ArgumentParser`, whose refusals are
one ``error:`` line naming the flag and what it takes (exit 2), like the
tools' other errors, and gives numeric flags a type from here, so that a value
out of range is refused while the arguments are read, not as a traceback
minutes later.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from polar_xtuner.errors import EXIT_USER


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line refusals: ``error: argument --x: ...``, exit 2.

    A flag given twice is refused, and so are two flags that set one value
    (``--shared-prefix --no-shared-prefix``): argparse keeps the last silently,
    which hides a mistake in a long command line. Flags declared with
    ``action="append"``, ``"extend"`` or ``"count"`` are repeatable.
    """

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's method
        for action in self._actions:  # groups' flags included: they share the parser's list
            if action.option_strings and not isinstance(action, (_REPEATABLE, _Once)):
                action.__class__ = type(f"Once{type(action).__name__}", (_Once, type(action)), {})
        self._polar_given = {}
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER)


_REPEATABLE = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction,
               argparse._ExtendAction, argparse._HelpAction, argparse._VersionAction)


class _Once:
    """Mixed into a flag's argparse action: the second time its value is given is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "_polar_given", None)
        if given is not None:
            first = given.get(self.dest)
            if first is not None:
                what = "given twice" if first == option_string else f"{first} was given too; give one of them"
                parser.error(f"argument {option_string}: {what}")
            given[self.dest] = option_string
        super().__call__(parser, namespace, values, option_string)


def _number(kind, text: str):
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("empty value")
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low or (high is not None and value > high):
            rule = f"of at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {rule}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


# A random seed: torch.manual_seed takes 0 to 2**64 - 1 (a larger one was an OverflowError traceback).
seed = int_at_least(0, 2**64 - 1)
seed.__name__ = "seed"


def float_in(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number between low and high (each end open or closed)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        bad = value < low or (low_open and value == low)
        if high is not None:
            bad |= value > high or (high_open and value == high)
        if bad:
            left = "(" if low_open else "["
            right = "" if high is None else (f", {high:g})" if high_open else f", {high:g}]")
            rule = f"> {low:g}" if high is None and low_open else f">= {low:g}" if high is None \
                else f"in {left}{low:g}{right}"
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text.strip()}")
        return value

    parse.__name__ = "number"
    return parse


def non_empty(text: str) -> str:
    """An argparse type: a path or name that is not empty or blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty value")
    return text


# The units transformers' max_shard_size reads (convert_file_size_to_int): a whole
# number of KB/MB/GB (powers of 10) or KiB/MiB/GiB (powers of 2).
_SIZE = re.compile(r"^\s*(\d+)\s*(KB|MB|GB|KIB|MIB|GIB)\s*$", re.I)
_UNIT = {"KB": "KB", "MB": "MB", "GB": "GB", "KIB": "KiB", "MIB": "MiB", "GIB": "GiB"}


def size(text: str) -> str:
    """An argparse type: a size in bytes such as 5GB or 500MiB, as transformers' max_shard_size takes it.

    Returns:
        The size spelled as transformers reads it (``5gb`` becomes ``5GB``: a
        lower-case ``b`` would mean bits there).
    """
    m = _SIZE.match(text)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of KB, MB, GB, KiB, MiB or GiB such as 5GB or 500MiB, got {text!r}")
    return f"{int(m.group(1))}{_UNIT[m.group(2).upper()]}"
