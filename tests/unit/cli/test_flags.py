"""Every numeric, path and name flag of every tool is checked before work starts.

A table walks each flag with a value out of range, a value of the wrong type
and an empty value: each is one ``error:`` line naming the flag, exit 2, no
traceback, and nothing written. The tools are called in-process (their
``main(argv)``), so the walk costs no interpreter starts.
"""
import os

import pytest

from common import load_tool
from polar_xtuner.cli.flags import float_in, int_at_least, size


def _tool(name):
    if name == "serve":  # tools/serve.sh runs polar_xtuner.serve.launcher
        from polar_xtuner.serve.launcher import main

        return main
    if name == "convert":  # tools/convert.sh runs polar_xtuner.convert.export
        from polar_xtuner.convert.export import main

        return main
    return load_tool(name).main


# tool -> (arguments that are otherwise valid, {flag: [out of range, wrong type]}); every flag is also tried empty
TABLE = {
    "build_dataset": (["SRC.jsonl", "-o", "OUT"], {
        "--val-ratio": ["1", "x"], "--val-size": ["-1", "1.5"], "--seed": ["-3", "one", "1180591620717411303424"],
        "--pairs-per-prompt": ["0", "2.0"], "--max-length": ["4", "1e3"], "--max-response-length": ["0", "?"],
        "--max-packed-length": ["3", "big"], "--tokenizer": [], "-o": [],
    }),
    "make_rft_data": (["SRC.jsonl", "-o", "OUT.parquet"], {
        "--data-source": [], "--ability": [], "--split": [], "-o": [],
    }),
    "make_demo_data": (["OUT"], {"--train": ["0", "many"], "--val": ["-1", "0.5"], "--seed": ["-1", "s", "18446744073709551616"]}),
    "make_tiny_model": (["OUT"], {"--seed": ["-1", "nan", "1180591620717411303424"]}),
    "eval_pref": (["--model", "M", "--data", "D.jsonl"], {
        "--model": [], "--data": [], "--out": [], "--save-scores": [], "--plot": [], "--server-address": [],
        "--batch-size": ["0", "2.5"], "--max-length": ["3", "x"], "--max-response-length": ["0", "1k"],
        "--concurrency": ["0", "many"], "--batch-tokens": ["-5", "1.0"], "--timeout": ["0", "nan"],
        "--max-retries": ["0", "three"],
    }),
    "convert": (["C.py", "CKPT", "OUT"], {"--max-shard-size": ["0GB", "1.5GiB"]}),
    "serve": (["M"], {"--port": ["0", "http"], "--host": [], "--dtype": [], "--python": [],
                      "--ready-timeout": ["-1", "inf"]}),
}
CASES = [(tool, flag, value) for tool, (_, flags) in TABLE.items() for flag, values in flags.items()
         for value in [*values, "", "  "]]


@pytest.mark.parametrize("tool, flag, value", CASES, ids=[f"{t}{f}={v!r}" for t, f, v in CASES])
def test_a_bad_flag_value_is_one_line_naming_the_flag(tool, flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs land here, and there must be none
    base, _ = TABLE[tool]
    argv = list(base)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(SystemExit) as e:
        _tool(tool)(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {flag}") and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


GOOD = {"--val-ratio": "0.1", "--max-shard-size": "5GB", "--timeout": "3", "--ready-timeout": "30",
        "--port": "30000", "--out": "r.json", "--save-scores": "s.jsonl", "--plot": "p.png",
        "-o": "OUT.parquet"}  # a value each flag takes ("7" for the rest)
TWICE = [(tool, flag) for tool, (_, flags) in TABLE.items() for flag in flags]


@pytest.mark.parametrize("tool, flag", TWICE, ids=[f"{t}{f}" for t, f in TWICE])
def test_a_flag_given_twice_is_one_line_naming_it(tool, flag, capsys, tmp_path, monkeypatch):
    """argparse would keep the last value silently; no flag of a tool is repeatable."""
    monkeypatch.chdir(tmp_path)
    base, _ = TABLE[tool]
    value = base[base.index(flag) + 1] if flag in base else GOOD.get(flag, "7")
    with pytest.raises(SystemExit) as e:
        _tool(tool)([*base, flag, value, flag, value] if flag not in base else [*base, flag, value])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: argument {flag}: given twice"), err
    assert os.listdir(tmp_path) == []


def test_two_flags_that_set_one_value_are_refused():
    from polar_xtuner.cli.flags import ArgumentParser

    p = ArgumentParser(prog="t")
    p.add_argument("--shared-prefix", dest="share", action="store_true")
    p.add_argument("--no-shared-prefix", dest="share", action="store_false")
    p.add_argument("--tag", action="append")
    p.add_argument("-v", action="count")
    assert p.parse_args(["--tag", "a", "--tag", "b", "-v", "-v"]).tag == ["a", "b"]  # declared repeatable
    assert p.parse_args(["--shared-prefix"]).share is True and p.parse_args([]).share is False
    with pytest.raises(SystemExit):
        p.parse_args(["--shared-prefix", "--no-shared-prefix"])
    with pytest.raises(SystemExit):
        p.parse_args(["--tag=a", "--shared-prefix", "--shared-prefix"])


# tool -> (its arguments, the positions of its positional arguments, by name): each is tried empty
POSITIONALS = {
    "build_dataset": (["SRC.jsonl", "-o", "OUT"], {"SRC": 0}),
    "make_rft_data": (["SRC.jsonl", "-o", "OUT.parquet"], {"SRC": 0}),
    "make_demo_data": (["OUT"], {"out_dir": 0}),
    "make_tiny_model": (["OUT"], {"out_dir": 0}),
    "convert": (["C.py", "CKPT", "OUT"], {"config": 0, "checkpoint": 1, "out_dir": 2}),
    "serve": (["M"], {"model_dir": 0}),
}
POSITIONAL_CASES = [(tool, name) for tool, (_, names) in POSITIONALS.items() for name in names]


@pytest.mark.parametrize("tool, name", POSITIONAL_CASES, ids=[f"{t}-{n}" for t, n in POSITIONAL_CASES])
def test_an_empty_positional_argument_is_one_line_naming_it(tool, name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, names = POSITIONALS[tool]
    argv = list(argv)
    argv[names[name]] = " "
    with pytest.raises(SystemExit) as e:
        _tool(tool)(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: argument {name}"), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("parse, good, bad", [
    (int_at_least(1), ["1", " 7 "], ["0", "-1", "1.0", "x", "", "1e3"]),
    (int_at_least(0, 10), ["0", "10"], ["11", "-1"]),
    (float_in(0, 1, high_open=True), ["0", "0.5", "0.999"], ["1", "-0.1", "nan", "inf", "x", ""]),
    (float_in(0, low_open=True), ["1e-3", "600"], ["0", "-1", "nan", "-inf"]),
    (size, ["5GB", "500MB", "2GiB", "5gb"], ["5", "GB", "0GB", "-1GB", "", "5 PB", "1.5GiB", "5TB", "100B"]),
])
def test_flag_types(parse, good, bad):
    import argparse

    for text in good:
        parse(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_every_accepted_size_is_the_one_transformers_reads():
    from transformers.utils.hub import convert_file_size_to_int

    cases = {"5GB": 5 * 10**9, "5gb": 5 * 10**9, " 500MiB ": 500 * 2**20, "64kib": 64 * 2**10, "7MB": 7 * 10**6}
    for text, expected in cases.items():
        assert convert_file_size_to_int(size(text)) == expected, text


# every POLAR_* variable of the RL reward functions: (bad values), each refused naming the variable
POLAR_VARIABLES = {
    "POLAR_TIMEOUT": ["0", "-1", "inf", "nan", "soon"],
    "POLAR_MAX_RETRIES": ["0", "1.5", "x", "true"],
    "POLAR_BATCH_SIZE": ["0", "-2", "2.5", "many"],
    "POLAR_BATCH_TOKENS": ["0", "1.5", "k"],
    "POLAR_CONCURRENCY": ["0", "four"],
    "POLAR_FALLBACK_SCORE": ["nan", "inf", "-inf", "low"],
    "POLAR_STRIP_THINKING": ["maybe", "2"],
    "POLAR_NORMALIZE": ["sure", "-1"],
    "POLAR_SERVER_TYPE": ["tgi", "VLLM "],
}
ENV_CASES = [(name, value) for name, values in POLAR_VARIABLES.items() for value in values]


@pytest.mark.parametrize("name, value", ENV_CASES, ids=[f"{n}={v}" for n, v in ENV_CASES])
def test_a_bad_polar_variable_is_refused_naming_it(name, value):
    from polar_xtuner.rl.reward import RFTConfigError, RFTSettings

    with pytest.raises(RFTConfigError) as e:
        RFTSettings.from_env({name: value})
    assert "\n" not in str(e.value) and str(e.value).startswith("POLAR_")
    assert name in str(e.value)
