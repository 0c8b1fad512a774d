"""`xtuner train` on every shipped config as shipped, then tools/convert.sh and tools/eval_pref.py.

Each config in configs/ (a new one is picked up by the glob) is copied with
only the model path (a tiny model at a quarter of the demo's width, with its reward token id), the data file
and the data cache folder swapped, and run with the users' command,
``xtuner train CONFIG --deepspeed configs/deepspeed/polar_zero2_cpu.json``
(the CPU twin of ``deepspeed_zero2``). Every other setting is the shipped one:
``max_packed_length`` of 32768 tokens, shared prefixes, activation
checkpointing, LoRA, accumulation, the schedule. The data fills about two
packed rows of the config's length (one whole step at the shipped
``accumulative_counts`` of 2), so the run takes a few iterations; the last checkpoint is converted with
its verification and the converted model is scored on held-out pairs, by
the tools' own ``main()`` in this process (the same code as their scripts,
whose processes the tools' own tests run; a process each cost about 10 s).

The two tiny configs are trained as shipped elsewhere, with the same command,
conversion and evaluation, and are not trained a second time here:
``TRAINED_AS_SHIPPED_BY`` names the test of each. A config whose code equals
another's but for the values of :data:`VALUE_ONLY` (the 1.8B recipes and their
7B twins: the model and the learning rate) builds and trains the same way once
the model is swapped, so it is trained once, as its twin (the 7B one, the
README's); the twins are found by comparing the configs' syntax trees, so a
recipe that gains any other difference is trained on its own again.
"""
import ast
import glob
import json
import math
import os
import re

import pytest

from common import REPO, VAL, config_as_shipped, load_tool, run_tool
from polar_xtuner.demo.tiny_model import TINY_REWARD_TOKEN_ID

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# config -> (the test that runs `xtuner train` on it as shipped, then converts and scores it; what it runs)
TRAINED_AS_SHIPPED_BY = {
    "POLAR_tiny_full_varlenattn_demo.py": ("tests/conftest.py", '"scripts/demo.sh"'),  # the session demo: e2e/test_demo.py
    "POLAR_tiny_lora_varlenattn_demo.py": ("tests/integration/convert/test_lora.py", "TINY_LORA"),
}
SHIPPED = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if os.path.basename(p) not in TRAINED_AS_SHIPPED_BY)
# Top-level knobs whose value, not presence, differs between the model sizes' recipes:
# the same code runs whatever their value, and the model path is swapped anyway.
VALUE_ONLY = ("pretrained_model_name_or_path", "lr")
DS_CPU = os.path.join(REPO, "configs", "deepspeed", "polar_zero2_cpu.json")
TRAIN = os.path.join(REPO, "data", "demo", "train.jsonl")
# demo pairs per 32768 tokens of packed rows with shared prefixes (1200 pairs: 44834 tokens, measured)
PAIRS_PER_32K = 880


def _cannot_run_on_cpu(path) -> str | None:
    from mmengine.config import Config

    import torch

    if torch.cuda.is_available():
        return None
    cfg = Config.fromfile(path)
    if cfg.model.llm.get("quantization_config") is not None:
        return "QLoRA's 4-bit base needs bitsandbytes' CUDA kernels (refused on CPU in one line: test_configs_exact)"
    if cfg.get("sequence_parallel_size", 1) > 1:
        return "sequence parallel needs a rank per slice of a row on GPUs (refused on CPU: integration/train/test_launch.py)"
    return None


def recipe_code(path) -> str:
    """The config's statements (comments dropped) with the values of :data:`VALUE_ONLY` blanked."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in VALUE_ONLY
                                                for t in node.targets):
            node.value = ast.Constant(None)
    return ast.dump(tree)


def twins(paths) -> dict:
    """{config: the config it is trained as}: equal :func:`recipe_code`, the last in ``paths`` kept."""
    kept, out = {}, {}
    for path in reversed(paths):
        code = recipe_code(path)
        if code in kept:
            out[path] = kept[code]
        else:
            kept[code] = path
    return out


TWINS = twins(SHIPPED)


def _data_for_rows(path, out, rows=2):
    """The first demo pairs, about ``rows`` packed rows of the config's max_packed_length."""
    from mmengine.config import Config

    n = max(32, round(rows * PAIRS_PER_32K * Config.fromfile(path).max_packed_length / 32768))
    with open(TRAIN, encoding="utf-8") as src:
        out.write_text("".join(src.readlines()[:n]))
    return str(out)


# The model's sizes are swapped too, to a quarter of the demo's width: what is tested is how each
# config builds and trains the model, which no width changes, and a row of 32768 tokens then costs
# a quarter of the demo model's time (the demo's sizes are what it needs to learn, not needed here).
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """The tiny POLAR model (tokenizer, reward token, remote code) at :data:`SMALL`'s sizes."""
    from polar_xtuner.demo.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("small_polar")), **SMALL)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_xtuner_train_convert_and_score_as_shipped(path, small_dir, tmp_path):
    if path in TWINS:
        pytest.skip(f"trained as {os.path.basename(TWINS[path])}: the same recipe but for the values of "
                    f"{', '.join(VALUE_ONLY)} (test_twins_differ_only_in_values_of_the_knobs_named)")
    reason = _cannot_run_on_cpu(path)
    if reason:
        pytest.skip(reason)
    data_file = _data_for_rows(path, tmp_path / "train.jsonl")
    cfg = config_as_shipped(path, str(tmp_path), pretrained_model_name_or_path=small_dir, data_files=data_file,
                            data_cache_dir=str(tmp_path / "cache"), reward_token_id=TINY_REWARD_TOKEN_ID)
    work = str(tmp_path / "work")
    proc = run_tool("xtuner", "train", cfg, "--deepspeed", DS_CPU, "--work-dir", work, timeout=600)
    log = proc.stdout + proc.stderr
    # xtuner's CLI exits 0 even when training fails: judge by the checkpoint and the log
    assert os.path.isfile(os.path.join(work, "last_checkpoint")), log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    # a few iterations, every logged ranking loss finite, the last iteration's checkpoint
    done = re.findall(r"Iter\(train\) \[ *(\d+)/(\d+)\].* loss: ([-\d.e+naninf]+)", log)
    assert done and 2 <= int(done[-1][1]) <= 12, log[-3000:]
    assert all(math.isfinite(float(loss)) for *_, loss in done), done
    assert f"iter_{done[-1][1]}.pth" in os.listdir(work)

    from polar_xtuner.convert.export import main as convert

    out = str(tmp_path / "hf")
    assert convert([cfg, work, out]) == 0  # with its verification: the trained weights bit for bit, and scores
    report = str(tmp_path / "report.json")
    assert load_tool("eval_pref").main(["--model", out, "--data", VAL, "--out", report]) == 0
    result = json.load(open(report))
    assert result["n"] == 200 and 0.0 <= result["accuracy"] <= 1.0


def test_the_configs_left_out_here_are_trained_as_shipped_by_the_tests_named():
    """A config is only left out while the test named for it runs it unchanged through `xtuner train`."""
    for name, (test, runs) in TRAINED_AS_SHIPPED_BY.items():
        assert os.path.isfile(os.path.join(REPO, "configs", name)), name
        text = open(os.path.join(REPO, test), encoding="utf-8").read()
        assert runs in text, (test, runs)
    assert "configs/POLAR_tiny_full_varlenattn_demo.py" in open(os.path.join(REPO, "scripts", "demo.sh")).read()
    assert 'TINY_LORA = os.path.join(REPO, "configs", "POLAR_tiny_lora_varlenattn_demo.py")' in open(
        os.path.join(REPO, "tests", "integration", "convert", "test_lora.py")).read()


def test_twins_differ_only_in_values_of_the_knobs_named(tmp_path):
    """Each 1.8B recipe is the 7B one's twin, and any other difference makes a config its own."""
    names = {os.path.basename(a): os.path.basename(b) for a, b in TWINS.items()}
    assert names == {"POLAR_1_8B_full_varlenattn_custom_dataset.py": "POLAR_7B_full_varlenattn_custom_dataset.py",
                     "POLAR_1_8B_lora_varlenattn_custom_dataset.py": "POLAR_7B_lora_varlenattn_custom_dataset.py"}
    shipped = os.path.join(REPO, "configs", "POLAR_7B_full_varlenattn_custom_dataset.py")
    text = open(shipped, encoding="utf-8").read()
    variants = {"lr.py": text.replace("\nlr = 2e-5", "\nlr = 3e-4  # another value"),
                "ckpt.py": text.replace("\nactivation_checkpointing = True", "\nactivation_checkpointing = False"),
                "extra.py": text + "\nshared_prefix = False\n"}
    for name, body in variants.items():
        assert body != text, name
        (tmp_path / name).write_text(body)
    found = twins([str(tmp_path / n) for n in variants] + [shipped])
    assert {os.path.basename(p) for p in found} == {"lr.py"}
