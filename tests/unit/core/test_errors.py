"""Every exception the package defines is a PolarError, so the CLIs alone decide exit codes."""
import ast
import glob
import importlib
import os

from common import REPO


def exception_classes():
    """(module, class name) of every class in polar_xtuner whose name ends in Error."""
    for path in sorted(glob.glob(os.path.join(REPO, "polar_xtuner", "**", "*.py"), recursive=True)):
        module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                yield module, node.name


def test_every_exception_of_the_package_is_a_polar_error():
    from polar_xtuner.errors import PolarError

    found = list(exception_classes())
    assert len(found) >= 15, found  # the walk found the package's errors
    outside = []
    for module, name in found:
        if module.endswith("vllm_plugin"):  # imports vLLM, which lives in its own venv
            continue
        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, PolarError):
            outside.append(f"{module}.{name}")
    assert not outside, f"exceptions outside PolarError: {outside}"
