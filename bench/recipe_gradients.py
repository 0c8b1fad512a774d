"""One training step of a config as shipped against the same pairs trained whole without recompute.

Usage (a library of the exactness test and scripts/gpu_check.sh's ``recipe_gradients`` step):
    from bench.recipe_gradients import build, train_step, compare

:func:`build` makes the model, the dataset and the collate function from a
copy of a config in which only the given top-level settings (paths, sizes) are
replaced; :func:`train_step` runs one train-mode step as mmengine's runner does,
through xtuner's own ``VarlenAttnArgsToMessageHubHook``, mmengine's data
preprocessor and ``parse_losses``; :func:`compare` gives the relative error of
the loss and of every gradient.
"""

from __future__ import annotations

import functools
import os
import re


def config_copy(src: str, dst_dir: str, name: str | None = None, **settings) -> str:
    """A copy of config ``src`` in ``dst_dir`` with the top-level ``name = ...`` lines given replaced."""
    with open(src, encoding="utf-8") as f:
        text = f.read()
    for key, value in settings.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", text, count=1, flags=re.M)
        if n != 1:
            raise KeyError(f"{os.path.basename(src)} has no top-level `{key} = ...`")
    os.makedirs(dst_dir, exist_ok=True)
    path = os.path.join(dst_dir, name or os.path.basename(src))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def build(config: str, work: str, seed: int = 0, **settings):
    """(model, dataset, collate_fn, cfg) built from a copy of ``config`` with ``settings`` swapped."""
    # torch, mmengine and xtuner load here, not on import: config_copy serves the tests' light helpers
    import torch
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    cfg = Config.fromfile(config_copy(config, work, **settings))
    torch.manual_seed(seed)  # LoRA's initial adapters
    model = BUILDER.build(cfg.model)
    dataset = BUILDER.build(cfg.train_dataloader.dataset)
    collate = dict(cfg.train_dataloader.collate_fn)
    return model, dataset, functools.partial(collate.pop("type"), **collate), cfg


def attention_modules(model) -> list:
    return [m for m in model.llm.modules() if type(m).__name__.startswith("InternLM2") and hasattr(m, "wqkv")]


def train_step(model, batch, seed: int = 0) -> dict:
    """One train-mode step on ``batch`` (a collate output): losses, gradients and attention calls per layer.

    The gradients are the parameters' ``.grad`` after backward, in fp32; the
    attention calls count each layer's forward and recomputes.
    """
    import torch
    from xtuner.engine.hooks import VarlenAttnArgsToMessageHubHook

    batch = {"data": dict(batch["data"]), "data_samples": batch.get("data_samples")}
    hook = VarlenAttnArgsToMessageHubHook()
    layers = attention_modules(model)
    calls = [0] * len(layers)
    handles = [m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(layers)]
    model.train()
    model.zero_grad(set_to_none=True)
    hook.before_train_iter(None, 0, batch)
    try:
        torch.manual_seed(seed)  # the same dropout draws for two runs of one layout
        data = model.data_preprocessor(batch, True)
        losses = model(**data, mode="loss")
        loss, _ = model.parse_losses(losses)
        loss.backward()
    finally:
        hook.after_train_iter(None, 0, batch)
        for h in handles:
            h.remove()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"losses": {k: v.detach().float() for k, v in losses.items()}, "grads": grads, "attention_calls": calls}


def compare(got: dict, want: dict) -> dict:
    """Relative errors of ``got`` against ``want`` (two :func:`train_step` results).

    ``loss``: |a - b| / |b|; ``grads``: per parameter, max |a - b| / max |b|
    (the largest error against the largest entry), and ``worst`` of them.
    """
    a, b = got["losses"]["loss"].item(), want["losses"]["loss"].item()
    missing = sorted(set(want["grads"]) ^ set(got["grads"]))
    errors = {}
    for name, g in want["grads"].items():
        if name in got["grads"]:
            errors[name] = ((got["grads"][name] - g).abs().max() / (g.abs().max().clamp_min(1e-30))).item()
    worst = max(errors, key=errors.get) if errors else None
    return {"loss": abs(a - b) / max(abs(b), 1e-30), "grads": errors, "missing": missing,
            "worst": (worst, errors[worst]) if worst else (None, float("nan"))}
