"""The package's architecture, checked: import-linter's contract, no private name across modules, nothing set up on import."""
import ast
import os
import shutil
import subprocess
import sys

from common import REPO

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(root):
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([LINT, "--config", os.path.join(root, "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_holds():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout, proc.stdout[-2000:]


def test_a_wing_importing_another_wing_breaks_the_contract(tmp_path):
    """The contract has teeth: a wing importing another off its arrows, and the core importing a wing, fail it."""
    for name in ("polar_xtuner", "tools", "bench", "configs"):
        shutil.copytree(os.path.join(REPO, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.png"))
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
    model = tmp_path / "polar_xtuner" / "train" / "model.py"
    model.write_text(model.read_text() + "\nfrom polar_xtuner.eval.report import format_report  # noqa\n")
    # eval_hook -> eval.metrics is an arrow; eval_hook -> eval.report is not
    hook = tmp_path / "polar_xtuner" / "train" / "eval_hook.py"
    hook.write_text(hook.read_text() + "\nimport polar_xtuner.eval.report  # noqa\n")
    records = tmp_path / "polar_xtuner" / "records.py"
    records.write_text(records.read_text() + "\nimport polar_xtuner.data.check  # noqa\n")
    proc = _lint(str(tmp_path))
    assert proc.returncode != 0
    assert "polar_xtuner.train.model -> polar_xtuner.eval.report" in proc.stdout, proc.stdout[-3000:]
    assert "polar_xtuner.train.eval_hook -> polar_xtuner.eval.report" in proc.stdout, proc.stdout[-3000:]
    assert "polar_xtuner.records -> polar_xtuner.data.check" in proc.stdout, proc.stdout[-3000:]


def test_importing_every_module_sets_nothing_up():
    """No module changes the environment, the signal handlers or sys.excepthook when imported."""
    code = (
        "import os, pkgutil, signal, sys, importlib\n"
        "import polar_xtuner\n"
        "# third-party packages set variables of their own (torch's inductor cache, cv2's Qt paths) on import\n"
        "for dep in ('torch', 'transformers', 'tokenizers', 'datasets', 'mmengine', 'xtuner', 'deepspeed', 'peft',\n"
        "            'xtuner.model.reward', 'xtuner.dataset.preference_dataset', 'cv2'):\n"
        "    importlib.import_module(dep)\n"
        "env, hook = dict(os.environ), sys.excepthook\n"
        "handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}\n"
        "names = [m.name for m in pkgutil.walk_packages(polar_xtuner.__path__, 'polar_xtuner.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
        "assert sys.excepthook is hook\n"
        "assert {s: signal.getsignal(s) for s in handlers} == handlers\n"
        "print(len(names))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 40  # every module of the package, wings included


SOURCES = ("polar_xtuner", "tools", "bench", "configs", "tests")
PROJECT = ("polar_xtuner", "tools", "bench")


def private_imports(root) -> list[str]:
    """``file:line name`` of each private name one module takes from another of the project.

    ``from M import _x`` anywhere (tests included), and ``m._x`` in the package,
    tools and bench where ``m`` is a project module bound by an import. Dunders
    (``__version__``) are public.
    """
    found = []
    for top in SOURCES:
        for dirpath, _, names in os.walk(os.path.join(root, top)):
            for name in sorted(n for n in names if n.endswith(".py")):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                tree = ast.parse(open(path, encoding="utf-8").read(), rel)
                bound = set()
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PROJECT)):
                        for alias in node.names:
                            if alias.name.startswith("_") and not alias.name.startswith("__"):
                                found.append(f"{rel}:{node.lineno} {node.module}.{alias.name}")
                            elif node.module and node.module.startswith(PROJECT):
                                bound.add(alias.asname or alias.name)  # maybe a module: checked below
                    elif isinstance(node, ast.Import):
                        for alias in node.names:
                            if alias.name.startswith(PROJECT):
                                bound.add(alias.asname or alias.name)
                if top == "tests":
                    continue  # tests may reach into a module (monkeypatch) but import nothing private
                for node in ast.walk(tree):
                    if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                            and isinstance(node.value, ast.Name) and node.value.id in bound):
                        found.append(f"{rel}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    """A leading underscore means "this module's own": nothing imports one from another module."""
    assert private_imports(REPO) == []


def test_a_private_import_is_caught(tmp_path):
    for name in SOURCES:
        shutil.copytree(os.path.join(REPO, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    tool = tmp_path / "tools" / "eval_pref.py"
    tool.write_text(tool.read_text() + "\nfrom polar_xtuner.records import _parsed  # noqa\n")
    hook = tmp_path / "polar_xtuner" / "train" / "eval_hook.py"
    hook.write_text(hook.read_text() + "\nimport polar_xtuner.records as r  # noqa\nr._parsed  # noqa\n")
    found = private_imports(str(tmp_path))
    assert len(found) == 2, found
    assert found[0].startswith("polar_xtuner/train/eval_hook.py:") and found[0].endswith("r._parsed"), found
    assert found[1].startswith("tools/eval_pref.py:") and found[1].endswith("polar_xtuner.records._parsed"), found


def test_the_commands_are_exactly_the_modules_with_a_command_line():
    import polar_xtuner

    found = set()
    for dirpath, _, names in os.walk(os.path.join(REPO, "polar_xtuner")):
        for name in names:
            path = os.path.join(dirpath, name)
            module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
            if name == "__main__.py":
                found.add(module.rsplit(".", 1)[0])
            elif name.endswith(".py") and 'if __name__ == "__main__"' in open(path, encoding="utf-8").read():
                found.add(module)
    assert found == set(polar_xtuner.COMMANDS)


def test_python_m_on_a_module_without_a_command_line_refuses_in_one_line():
    """It used to import and exit 0, so bench/convert_memory.py timed a conversion that never ran."""
    for module in ("polar_xtuner.convert.export", "polar_xtuner.records", "polar_xtuner.scoring.local"):
        proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (module, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and "not a command" in proc.stderr and "python -m polar_xtuner.convert" \
            in proc.stderr, proc.stderr
    for module in __import__("polar_xtuner").COMMANDS:  # each runs its own command line
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
        assert "usage:" in proc.stdout + proc.stderr and "not a command" not in proc.stderr, (module, proc.stderr)


def test_only_python_m_is_read_from_the_command_line():
    from polar_xtuner import module_run_by_python_m as target

    assert target(["python", "-m", "polar_xtuner.records", "-m", "x"]) == "polar_xtuner.records"
    assert target(["python", "-X", "dev", "-W", "error", "-mpolar_xtuner.records"]) == "polar_xtuner.records"
    assert target(["python", "tools/eval_pref.py", "-m", "polar_xtuner.records"]) is None
    assert target(["python", "-c", "pass", "-m", "polar_xtuner.records"]) is None
    assert target(["python"]) is None
