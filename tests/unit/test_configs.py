"""Every config loads with mmengine and every component accepts its arguments."""
import glob
import inspect
import json
import os

import pytest
from mmengine.config import Config
from mmengine.config.lazy import LazyAttr, LazyObject

from common import REPO
from polar_xtuner.constants import POLAR_REWARD_TOKEN_ID


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
DS_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "deepspeed", "*.json")))


def _resolve(t):
    if isinstance(t, (LazyObject, LazyAttr)):
        return t.build()
    return t


def _components(node, path="cfg"):
    """Yield (path, callable, kwargs) for every dict with a `type` in the config."""
    if isinstance(node, dict):
        if "type" in node and not isinstance(node["type"], str):
            kwargs = {k: v for k, v in node.items() if k != "type"}
            yield path, _resolve(node["type"]), kwargs
        for k, v in node.items():
            yield from _components(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _components(v, f"{path}[{i}]")


def test_config_names_are_unique():
    # xtuner resolves configs by basename: ours must not shadow each other.
    names = [os.path.basename(p) for p in CONFIGS + DS_CONFIGS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_binds(path):
    cfg = Config.fromfile(path)
    comps = list(_components(cfg._cfg_dict))
    assert len(comps) >= 10
    for where, fn, kwargs in comps:
        target = fn.__init__ if inspect.isclass(fn) else fn
        sig = inspect.signature(target)
        params = list(sig.parameters.values())
        if inspect.isclass(fn):
            params = params[1:]  # self
        # Components whose required positional inputs are filled in by the
        # runner (optimizer params, collate instances...) bind partially.
        try:
            inspect.Signature(params).bind_partial(**kwargs)
        except TypeError as e:
            pytest.fail(f"{where} ({getattr(fn, '__name__', fn)}): {e}")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_keeps_polar_settings(path):
    cfg = Config.fromfile(path)
    assert cfg.loss_type == "ranking" and cfg.penalty_type == "none"
    assert cfg.max_packed_length == 2 * cfg.max_length
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0 and cfg.max_norm == 1
    assert cfg.warmup_ratio == 0.03
    assert cfg.param_scheduler[1]["eta_min"] == pytest.approx(cfg.lr * 0.1)
    # the top-level name is dropped (xtuner's CLI would demand flash-attn); the flag must agree everywhere
    assert "use_varlen_attn" not in cfg
    varlen = cfg.model.use_varlen_attn
    assert varlen is True
    assert cfg.train_dataloader.collate_fn.use_varlen_attn is varlen
    assert cfg.train_dataloader.dataset.use_varlen_attn is varlen
    hooks = [h["type"].__name__ for h in cfg.custom_hooks]
    assert "VarlenAttnArgsToMessageHubHook" in hooks
    # activation_checkpointing: a PART 1 setting that reaches the model; the top-level name is
    # dropped, as mmengine's Runner would read it as a list of module names to wrap
    assert "activation_checkpointing" not in cfg
    assert cfg.model.use_activation_checkpointing == _part1_value(path, "activation_checkpointing")
    if cfg.val_files:
        assert "PolarEvalHook" in hooks and os.path.isfile(os.path.join(REPO, cfg.val_files))
    assert cfg.visualizer.vis_backends[0]["type"].__name__ == "TensorboardVisBackend"
    assert os.path.isfile(os.path.join(REPO, cfg.data_files))
    # the loss options exist, are off (the published loss), and reach the model and the collate function
    assert (cfg.margin, cfg.center_rewards_coefficient, cfg.loss_in_fp32) == (False, 0.0, False)
    assert (cfg.model.margin, cfg.model.center_rewards_coefficient, cfg.model.loss_in_fp32) == (False, 0.0, False)
    assert cfg.train_dataloader.collate_fn.type.__name__ == "polar_collate_fn"


def test_policy_discrimination_config_keeps_the_papers_values():
    cfg = Config.fromfile(os.path.join(REPO, "configs", "POLAR_1_8B_policy_discrimination_pretrain.py"))
    assert cfg.pretrained_model_name_or_path == "internlm/POLAR-1_8B-Base"
    assert (cfg.lr, cfg.max_epochs, cfg.max_response_length) == (1.4e-5, 1, 4096)  # arXiv 2507.05197 App. D.1
    assert cfg.max_length == 2 * 1024 + 2 * 4096 + 4 and cfg.reward_token_id == POLAR_REWARD_TOKEN_ID
    recs = [json.loads(line) for line in open(os.path.join(REPO, cfg.data_files))]
    assert recs and all(r["policy"] != r["rejected_policy"] for r in recs)


@pytest.mark.parametrize("name,model,lr", [
    ("POLAR_1_8B_full_varlenattn_custom_dataset.py", "internlm/POLAR-1_8B-Base", 1e-5),
    ("POLAR_7B_full_varlenattn_custom_dataset.py", "internlm/POLAR-7B-Base", 2e-5),
])
def test_gpu_configs_keep_published_values(name, model, lr):
    cfg = Config.fromfile(os.path.join(REPO, "configs", name))
    assert cfg.pretrained_model_name_or_path == model and cfg.lr == lr
    assert cfg.model.use_varlen_attn is True and cfg.reward_token_id == POLAR_REWARD_TOKEN_ID
    assert (cfg.max_length, cfg.max_response_length) == (16384, 4096)
    assert (cfg.batch_size, cfg.accumulative_counts, cfg.max_epochs) == (1, 2, 1)
    assert (cfg.save_steps, cfg.save_total_limit) == (500, 2)


def test_every_zero_stage_has_a_gpu_and_a_cpu_json():
    names = {os.path.basename(p) for p in DS_CONFIGS}
    for stage in ("zero1", "zero2", "zero3", "zero3_offload"):
        assert {f"polar_{stage}.json", f"polar_{stage}_cpu.json"} <= names, stage


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_deepspeed_configs(path):
    ds = json.load(open(path))
    stage = int(os.path.basename(path).split("zero")[1][0])
    assert ds["zero_optimization"]["stage"] == stage
    if path.endswith("_cpu.json"):
        # explicit dtypes: xtuner's "auto" probe crashes on CPU
        assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    else:
        assert ds["bf16"]["enabled"] == "auto" and "fp16" not in ds


def _part1_value(path, name):
    """The literal value of a top-level ``name = ...`` in PART 1 of a config (read with ast, nothing run)."""
    import ast

    text = open(path, encoding="utf-8").read()
    part2 = text.index("PART 2")
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            assert sum(len(line) + 1 for line in text.splitlines()[:node.lineno - 1]) < part2, f"{name} after PART 1"
            return ast.literal_eval(node.value)
    raise AssertionError(f"{os.path.basename(path)} has no top-level {name} = ...")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_activation_checkpointing_is_set_with_its_memory_reason(path):
    """Every GPU config recomputes (a 32768-token row's activations do not fit otherwise); the tiny CPU ones do not."""
    value = _part1_value(path, "activation_checkpointing")
    text = open(path, encoding="utf-8").read()
    comment = text[:text.index("activation_checkpointing = ")].rsplit("\n\n", 1)[-1]
    assert "GiB" in comment or "MB" in comment, "the setting's comment gives its memory reason"
    assert value is ("tiny" not in os.path.basename(path))


SP_CONFIG = os.path.join(REPO, "configs", "POLAR_7B_full_varlenattn_sp4_custom_dataset.py")


def test_sp_config_variant():
    from mmengine.config import Config

    cfg = Config.fromfile(SP_CONFIG)
    assert cfg.sequence_parallel_size == 4
    assert cfg.max_length % 4 == 0 and cfg.max_length == 4 * 16384
    assert cfg.accumulative_counts == 2 * 4  # rows per optimizer step as without it
    assert cfg.train_dataloader.sampler.type.__name__ == "SequenceParallelSampler"
    assert cfg.model.use_varlen_attn is True



@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_the_optimizer_is_adamw_fused_on_the_gpu_recipes(path):
    import torch

    cfg = Config.fromfile(path)
    spec = cfg.optim_wrapper.optimizer
    assert _resolve(spec["type"]) is torch.optim.AdamW
    assert spec["fused"] is cfg.fused_adamw is ("tiny" not in os.path.basename(path))


def test_fused_adamw_is_the_unfused_update_to_fp32_rounding(tiny_dir, tokenizer):
    """The 1.8B recipe's optimizer as its config builds it (fused) against the same AdamW unfused.

    Five steps on the recipe's model (a shared-prefix row, every layer
    recomputed), the learning rate raised to the demo's so that the steps
    move the weights: they agree to 1% of one step's size (AdamW moves a
    weight by about lr a step), where a wrong update (bias correction,
    betas, decay) would be off by a whole step. Fused kernels only round
    differently (CPU, fp32; CUDA runs the same update in its own kernel).
    """
    from common import build_reward_model, loss_and_grads, prompt_groups, shared_row_batch

    cfg = Config.fromfile(os.path.join(REPO, "configs", "POLAR_1_8B_full_varlenattn_custom_dataset.py"))
    spec = dict(cfg.optim_wrapper.optimizer, lr=1e-3)
    build = _resolve(spec.pop("type"))
    data = shared_row_batch(prompt_groups(tokenizer))
    weights = {}
    for fused in (True, False):
        model = build_reward_model(tiny_dir).train()
        opt = build(model.parameters(), **dict(spec, fused=fused or None, foreach=None if fused else False))
        for _ in range(5):
            loss_and_grads(model, data)
            opt.step()
        weights[fused] = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = dict(build_reward_model(tiny_dir).named_parameters())
    for name, w in weights[True].items():
        ref = weights[False][name]
        assert (w - ref).abs().max() <= 0.01 * spec["lr"], name
        assert (ref - start[name]).abs().max() > spec["lr"], name  # the steps moved this weight
