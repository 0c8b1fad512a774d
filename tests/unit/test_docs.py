"""The docs name only things that exist: files, links and their anchors, make targets, tool flags, modules.

Every command, flag and file path that README.md and docs/*.md name is
checked against the tree, so a renamed file, a dropped flag or a moved
section fails here rather than in a user's shell.
"""
import glob
import os
import re

import pytest

from common import REPO

PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
# Paths the docs use as a user's own (placeholders), not files of this repository.
USER_PATHS = ("data/mine", "data/pdl")
TOP = r"(?:configs|tools|scripts|polar_xtuner|bench|tests|docs|data|\.ci)"
PATH = re.compile(rf"(?<![\w./-])(?:\.\./)?{TOP}/[\w./{{}},*-]*[\w*}}]")
# A tool's flags live in the source that parses them; the launchers pass the rest to `xtuner train`.
TOOL_SOURCES = {
    "tools/convert.sh": ["polar_xtuner/convert/export.py"],
    "tools/serve.sh": ["polar_xtuner/serve/launcher.py"],
    **{f"scripts/{name}.sh": ["polar_xtuner/train/launch.py", "XTUNER_TRAIN"]
       for name in ("train", "train_multi_node", "train_slurm")},
    # thin `python -m` entries: the flags live in the module they run
    "polar_xtuner.convert": ["polar_xtuner/convert/export.py"],
    "polar_xtuner.cpu_ranks": ["polar_xtuner/train/cpu_ranks.py"],
}


def read(page):
    if page == "XTUNER_TRAIN":  # xtuner's own train parser
        import importlib.util

        page = os.path.join(os.path.dirname(importlib.util.find_spec("xtuner").origin), "tools", "train.py")
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def code_texts(text):
    """The fenced blocks and inline code spans of a markdown text."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", rest)  # a span may wrap onto the next line
    return blocks + [span.replace("\n", " ") for span in spans if "\n\n" not in span]


def expand(path):
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for part in m.group(1).split(",") for q in expand(path[:m.start()] + part + path[m.end():])]


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES)
def test_every_path_the_docs_name_exists(page):
    text = read(page)
    base = os.path.dirname(os.path.join(REPO, page))
    missing = []
    for code in code_texts(text):  # links are checked by the next test
        for raw in PATH.findall(code):
            path = raw.rstrip(".,:;")
            if path.startswith(USER_PATHS):
                continue
            for one in expand(path):  # configs/deepspeed/polar_zero{1,2}.json names two files
                root = base if one.startswith("../") else REPO  # commands run from the repository root
                if not glob.glob(os.path.normpath(os.path.join(root, one))):
                    missing.append(one)
    assert not missing, f"{page} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_anchor_resolves(page):
    text = read(page)
    base = os.path.dirname(os.path.join(REPO, page))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(REPO, page)
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and full.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", open(full, encoding="utf-8").read(), re.M)
            if anchor not in {slug(h) for h in headings}:
                bad.append(target)
    assert not bad, f"{page}: links that do not resolve: {bad}"


def commands(text):
    """(program, the rest of its command line) for every tool, script and make call in the code."""

    def until_next_command(rest):  # a usage line's a|b alternatives are not a pipe
        return re.split(r";|&&|\s\|\s|\s#|`", rest)[0]

    for code in code_texts(text):
        code = code.replace("\\\n", " ")
        for line in code.splitlines():
            for m in re.finditer(r"((?:tools|scripts)/[\w.]+\.(?:py|sh))", line):
                yield m.group(1), until_next_command(line[m.end():])
            for m in re.finditer(r"python -m (polar_xtuner(?:\.\w+)+)", line):
                yield m.group(1), until_next_command(line[m.end():])
            for m in re.finditer(r"(?:^|[\s(])make ((?:[\w-]+ ?)+)", line):
                yield "make", m.group(1)


@pytest.mark.parametrize("page", PAGES)
def test_every_command_and_flag_the_docs_name_exists(page):
    makefile = read("Makefile")
    bad = []
    for program, args in commands(read(page)):
        if program == "make":
            for target in args.split():
                if not re.search(rf"^{re.escape(target)}:", makefile, re.M):
                    bad.append(f"make {target}")
            continue
        own = program
        if program.startswith("polar_xtuner."):  # python -m: a module, or a package with __main__.py
            own = program.replace(".", "/") + ".py"
            if not os.path.exists(os.path.join(REPO, own)):
                own = program.replace(".", "/") + "/__main__.py"
        if not os.path.exists(os.path.join(REPO, own)):
            bad.append(program)
            continue
        code = "".join(read(source) for source in TOOL_SOURCES.get(program, [own]))
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
            if f'"{flag}"' not in code and f"'{flag}'" not in code:
                bad.append(f"{program} {flag}")
    assert not bad, f"{page} names commands or flags that do not exist: {sorted(set(bad))}"


@pytest.mark.parametrize("page", PAGES)
def test_every_module_and_name_the_docs_name_exists(page):
    bad = []
    for code in code_texts(read(page)):
        for dotted in re.findall(r"\bpolar_xtuner(?:\.\w+)+", code):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):  # the longest prefix that is a module or package
                module = os.path.join(REPO, *parts[:i])
                if os.path.exists(module + ".py") or os.path.isdir(module):
                    break
            else:
                bad.append(dotted)
                continue
            rest = parts[i:]
            if rest:
                source = read(os.path.relpath(module + ".py" if os.path.exists(module + ".py")
                                              else os.path.join(module, "__init__.py"), REPO))
                if not re.search(rf"^(?:def|class|async def) {rest[0]}\b|^{rest[0]}\s*[:=]", source, re.M):
                    bad.append(dotted)
    assert not bad, f"{page} names modules or names that do not exist: {sorted(set(bad))}"
