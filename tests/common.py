"""Plain helpers and constants shared by the tests (fixtures live in conftest.py).

Import them as ``from common import ...``: pytest puts tests/ on sys.path
(rootdir conftest, no __init__.py), so this module is found from every test
file and from conftest.py alike.
"""
import os
import re
import sys

from polar_xtuner.train.launch import free_port  # noqa: F401 - the project's one free-port helper, for the tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "tests", "assets")
BENCH = os.path.join(REPO, "bench")
TINY_CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")
VAL = os.path.join(REPO, "data", "demo", "val.jsonl")


def ranks_failure(stderr: str, tail: int = 3000) -> str:
    """An assertion message for a failed multi-rank run: each rank's last error line, then the tail.

    torchrun prefixes a rank's traceback with ``[rankN]:`` and prints the
    rank that failed first (the root cause) before the one it then stopped,
    so the tail alone often shows only the second rank's symptom.
    """
    last = {}
    for line in stderr.splitlines():
        m = re.match(r"\[rank(\d+)\]:\s*(\S*(Error|Exception)\b.*)", line)
        if m:
            last[int(m.group(1))] = m.group(2)
    head = "".join(f"rank {r}: {msg}\n" for r, msg in sorted(last.items()))
    return head + stderr[-tail:]


def run_tool(*args, cwd=REPO, env=None, timeout=900):
    """Run a repository tool with this interpreter; return the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ)
    # xtuner's CLI starts `python` from PATH: make it this interpreter.
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    # A single-process DeepSpeed run still opens a rendezvous port (29500 by
    # default); a free one lets test runs and other jobs coexist.
    full_env.setdefault("MASTER_PORT", str(free_port()))
    full_env.setdefault("PORT", str(free_port()))  # torchrun's, for NPROC_PER_NODE > 1
    full_env.update(env or {})
    return subprocess.run(list(args), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def load_tool(name):
    """``tools/<name>.py`` as a module (``tools/`` is a folder of scripts): its main() runs in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(main, args, capsys):
    """A tool's ``main(args)`` in this process, as a CompletedProcess (its exit code, stdout, stderr).

    For tests whose subject is the tool's logic, not its process: the same code
    without a few seconds of start-up. ``capsys`` is pytest's fixture.
    """
    import subprocess

    capsys.readouterr()  # what the test printed before is not the tool's
    code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, *capsys.readouterr())


def assert_converted(out_dir, state_dict):
    """A converted model dir holds exactly training's weights (``llm.*`` named ``model.*``), in HF's layout."""
    import json

    import torch
    from safetensors.torch import load_file

    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    want = {("model." + k[4:] if k.startswith("llm.") else k): v.float() for k, v in state_dict.items()}
    assert saved.keys() == want.keys()
    for k in want:
        assert torch.equal(saved[k], want[k]), k
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert "attn_implementation" not in cfg and cfg["torch_dtype"] == "float32"
    assert os.path.isfile(os.path.join(out_dir, "modeling_internlm2.py"))
    assert "config" in open(os.path.join(out_dir, "README.md")).read()


def publish_varlen_args(cu=None, max_seqlen=None):
    """What xtuner's VarlenAttnArgsToMessageHubHook does before a step (rank 0)."""
    from mmengine import MessageHub

    hub = MessageHub.get_instance("varlen_attn_args")
    hub.update_info("cumulative_len_rank_0", cu)
    hub.update_info("max_seqlen_rank_0", max_seqlen)


def build_reward_model(tiny_dir, use_varlen_attn=True, **kw):
    """PolarRewardModel over a model directory, as the GPU configs build it (activation checkpointing on).

    In eval mode; a test that trains calls ``.train()``, and then every layer is
    recomputed in backward, as in the shipped 1.8B and 7B recipes.
    """
    import torch

    from polar_xtuner.train.model import PolarRewardModel

    torch.manual_seed(0)
    kw = {"loss_type": "ranking", "penalty_type": "none", "use_activation_checkpointing": True, **kw}
    return PolarRewardModel.from_model_dir(tiny_dir, use_varlen_attn=use_varlen_attn, **kw).eval()


def copy_config(dst_dir, name, model_dir, data_file, append="", **settings):
    """A copy of the demo config pointing at test paths (docs/training.md's 'copy the config' way)."""
    return config_as_shipped(TINY_CONFIG, dst_dir, name=name, append=append,
                             pretrained_model_name_or_path=model_dir, data_files=data_file, **settings)


def config_as_shipped(src, dst_dir, name=None, append="", **settings):
    """A copy of config ``src`` in ``dst_dir`` with the PART 1 settings given (paths, sizes) replaced.

    Every other line is the shipped file's, so what is built from the copy is
    what users build, but for the model path, the data and the sizes a test
    swaps (bench/recipe_gradients.py's ``config_copy``, plus ``append``).
    """
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    from recipe_gradients import config_copy

    path = config_copy(src, dst_dir, name, **settings)
    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.write(append)
    return path
