"""Plain helpers and constants shared by the tests (fixtures live in conftest.py).

Import them as ``from common import ...``: pytest puts tests/ on sys.path
(rootdir conftest, no __init__.py), so this module is found from every test
file and from conftest.py alike.
"""
import json
import os
import re
import sys

from polar_xtuner.train.launch import free_port  # noqa: F401 - the project's one free-port helper, for the tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "tests", "assets")
TINY_CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")
VAL = os.path.join(REPO, "data", "demo", "val.jsonl")
# The environment of the tests' eager vLLM servers (the fleet's replicas, bench's stock
# server, the bare server): the engine core runs the model worker itself, the layout vLLM
# gives one GPU, instead of in a third process that imports vLLM again (about 7 s of CPU a
# start on 2 cores). vLLM's CPU platform keeps the worker apart for its OpenMP thread binding
# unless VLLM_ENABLE_V1_MULTIPROCESSING is 0 (vllm/platforms/cpu.py); nothing these servers
# are asked depends on that binding. tools/serve.sh sets nothing, and the serve.sh server of
# tests/integration/serve/test_serve.py runs vLLM's CPU default, its worker apart.
ONE_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


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


def saved_scores(path) -> list[tuple[float, float]]:
    """(chosen, rejected) per pair from a ``tools/eval_pref.py --save-scores`` file."""
    return [(r["chosen"], r["rejected"]) for r in map(json.loads, open(path))]


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
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's refusals exit; the interpreter would turn this into an exit code
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(list(args), code or 0, *capsys.readouterr())


def run_tool_here(capsys, name, *args):
    """``tools/<name>.py``'s main() on ``args`` in this process, as :func:`run_in_process` returns it."""
    return run_in_process(load_tool(name).main, [str(a) for a in args], capsys)


def one_error_line(err: str) -> str:
    """A tool's stderr after a clean failure: no traceback and exactly one ``error:`` line, which is returned."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def snapshot(path) -> dict:
    """File name (relative to ``path``) -> SHA-1 of its bytes, for every file under ``path`` ({} if it does not exist).

    Two snapshots are equal when a run left the folder exactly as it was.
    """
    import hashlib

    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha1(f.read()).hexdigest()
    return out


def assert_converted(out_dir, state_dict):
    """A converted model dir holds exactly training's weights (``llm.*`` named ``model.*``), in HF's layout."""
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
    from bench.recipe_gradients import config_copy

    path = config_copy(src, dst_dir, name, **settings)
    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.write(append)
    return path


# Shared-prefix rows and the same pairs whole, for the exactness tests.

def prompt_sharing_records(seed=0, margins=True):
    """9 records sharing prompts and references: 3 per prompt, answers drawn from other records."""
    from polar_xtuner.demo.data import generate

    base = list(generate(12, seed))
    records = []
    for p in range(3):
        for r in range(3):
            other = base[3 + 3 * p + r]
            records.append({**base[p], "chosen": base[p]["chosen"] if r == 0 else other["chosen"],
                            "rejected": other["rejected"], **({"margin": 0.5 * r} if margins else {})})
    return records


def prompt_groups(tokenizer, max_length=512, split_at=None, seed=0):
    """:func:`prompt_sharing_records` as shared-prefix groups, one per prompt (or its parts when split)."""
    from polar_xtuner.encoding import PolarEncoder
    from polar_xtuner.encoding.shared_prefix import Group

    records = prompt_sharing_records(seed)
    feats = PolarEncoder(tokenizer, max_length, 128).encode_pairs(records)
    groups = []
    for p in range(3):
        seqs, pairs = [], []
        for r in range(3):
            f, rec = feats[3 * p + r], records[3 * p + r]
            idx = []
            for s in (f["chosen_ids"], f["rejected_ids"]):
                if s not in seqs:
                    seqs.append(s)
                idx.append(seqs.index(s))
            pairs.append((idx[0], idx[1], rec["margin"]))
        group = Group.from_sequences(seqs, pairs)
        groups += group.split(split_at) if split_at else [group]
    return groups


def whole_pairs_batch(groups):
    """The groups' pairs, in order, as a packed row of whole sequences: (data, cu_seqlens, max_seqlen)."""
    import torch

    ids, pos, labels, cu, margins = [], [], [], [0], []
    for g in groups:
        for i, j, m in g.pairs:
            for s, label in ((g.sequence(i), 0), (g.sequence(j), 1)):
                ids += s
                pos += range(len(s))
                labels += [-100] * (len(s) - 1) + [label]
                cu.append(len(ids))
            margins.append(m)
    data = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "labels": torch.tensor([labels]),
            "margins": torch.tensor(margins)}
    return data, torch.tensor(cu, dtype=torch.int32), max(b - a for a, b in zip(cu, cu[1:]))


def shared_row_batch(groups):
    """The groups as one shared-prefix row, as the model takes it."""
    import torch

    from polar_xtuner.encoding.shared_prefix import pack_groups

    row = pack_groups(groups)
    return {"input_ids": row.input_ids[None], "position_ids": row.position_ids[None],
            "labels": torch.full((1, len(row.input_ids)), -100), "shared_prefix": row}


def loss_and_grads(model, data, cu=None, max_seqlen=None):
    """One loss-mode forward and backward (bounds published as xtuner's hook does): (outputs, gradients)."""
    model.zero_grad()
    publish_varlen_args(cu, max_seqlen)
    try:
        out = model(dict(data), mode="loss")
    finally:
        publish_varlen_args(None, None)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def polar_env(monkeypatch, server, model_dir, **more):
    """The RL reward's settings for a served model: POLAR_SERVER_TYPE vllm, the server's address, the model dir."""
    monkeypatch.setenv("POLAR_SERVER_TYPE", "vllm")
    monkeypatch.setenv("POLAR_SERVER_ADDRESS", server if isinstance(server, str) else server.address)
    monkeypatch.setenv("POLAR_MODEL", model_dir)
    for k, v in more.items():
        monkeypatch.setenv(k, str(v))
