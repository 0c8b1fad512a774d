"""POLAR reward-model fine-tuning on xtuner.

A core (constants, errors, precision, signals; records, hf_layout, outputs;
encoding) under two shared services (scoring, cli), under one subpackage per
job: data, train, convert, eval, serve, rl and demo. docs/development.md draws
the layers; pyproject.toml's import-linter contract enforces them. Importing the
package runs nothing: entry points set their process up
(:func:`polar_xtuner.cli.entry.start_tool`). ``python -m`` on a module that is not
one of :data:`COMMANDS` is refused in one line, rather than importing it and
exiting 0 having done nothing.
"""

import sys

__version__ = "0.1.0"

# The modules `python -m` runs; tests/unit/test_layers.py checks that these are exactly
# the modules with a command line (a __main__.py, or a main-guard block at the bottom).
COMMANDS = ("polar_xtuner.convert", "polar_xtuner.cpu_ranks", "polar_xtuner.serve.launcher",
            "polar_xtuner.train.launch")


def module_run_by_python_m(argv=None) -> str | None:
    """The module named by ``python -m MODULE`` in this interpreter's command line, or None."""
    args = list(getattr(sys, "orig_argv", []) if argv is None else argv)[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m":
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith("-m"):
            return a[2:]
        if a in ("-W", "-X"):  # interpreter options that take a value
            i += 2
            continue
        if not a.startswith("-") or a in ("-c", "-"):
            return None  # a script, -c code or stdin: no -m
        i += 1
    return None


def refuse_module_without_command_line(package: str, commands, argv=None) -> None:
    """Exit 2 with one line when ``python -m`` names a module of ``package`` outside ``commands``.

    Called from a package's ``__init__``, which ``python -m package.module``
    runs first: without it a library module would import and exit 0, and a
    script that ran it would take that for success.
    """
    target = module_run_by_python_m(argv)
    if target and target.split(".")[0] == package and target not in commands:
        sys.stderr.write(f"python -m {target}: not a command (it has no command line); the commands are "
                         f"{', '.join('python -m ' + c for c in commands)}\n")
        raise SystemExit(2)


refuse_module_without_command_line("polar_xtuner", COMMANDS)
