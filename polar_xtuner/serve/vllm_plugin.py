"""A vLLM plugin: POLAR's reward scored at the last token, with prefix caching.

Stock vLLM (0.32) serves InternLM2ForRewardModel with per-token pooling only
(task ``token_classify``): every request computes and returns a score for
every token, and never reads the prefix cache, because a cached prefix would
leave tokens without a score. A POLAR reward is one number, at the reward
token, and the texts scored together share long prefixes: the chosen and
rejected answers of a pair, or the rollouts of one RL prompt, all start with
``prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n"``.

With this plugin installed beside vLLM, the model also offers ``classify``:
last-token pooling, which vLLM lets read the prefix cache, so a shared prefix
is computed once. vLLM then serves ``classify`` on ``/pooling`` (its choice
when a model offers both), answering each text with ``[[score]]``: the
per-token shape cut to its last row, so every client that reads the last
token's score (``data[-1][0]``: ours, POLAR's ``RewardModelClient``) reads the
same number as before. Measured on the tiny model on 2 CPU cores
(bench/README.md): 2.7-2.9x the rollouts/s on RL groups (8 rollouts of a
prompt share its prefix), 1.8-2.0x the pairs/s on 780-token pairs and
1.1-1.5x on 40-token ones, for our client and POLAR's, with the same scores.

``--pooler-config '{"task": "token_classify"}'`` brings back every token's
score. vLLM finds the plugin through this package's ``vllm.general_plugins``
entry point: ``make serve-setup`` installs the package into ``.venv-serve``;
elsewhere run ``pip install --no-deps -e .`` in vLLM's environment. A vLLM
whose internals differ from the tested 0.32 keeps its own model class (one
warning line) rather than failing to start.
"""

from __future__ import annotations

import logging

ARCHITECTURE = "InternLM2ForRewardModel"
# vLLM internals the class is built from (tested with vLLM 0.32.0).
_NEEDED = (
    ("vllm.model_executor.models.internlm2", "InternLM2ForRewardModel"),
    ("vllm.model_executor.layers.pooler.special", "DispatchPooler"),
    ("vllm.model_executor.layers.pooler.seqwise.poolers", "SequencePooler"),
    ("vllm.model_executor.layers.pooler.seqwise.poolers", "pooler_for_classify"),
    ("vllm.model_executor.layers.pooler.tokwise.poolers", "pooler_for_token_classify"),
)


def _resolve() -> tuple[dict, list[str]]:
    """The needed vLLM names this vLLM has ({name: object}) and lacks (["module:name"])."""
    import importlib

    found, missing = {}, []
    for module, name in _NEEDED:
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            missing.append(f"{module}:{name}")
    return found, missing


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    from vllm import ModelRegistry

    missing = _resolve()[1]
    if missing:
        logging.getLogger(__name__).warning(
            "polar_xtuner vLLM plugin: this vLLM lacks %s; serving its own %s (per-token scores, no prefix "
            "caching)", ", ".join(missing), ARCHITECTURE)
        return
    # A "module:Class" string: vLLM imports it lazily, in the process that builds the model.
    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:PolarInternLM2ForRewardModel")


def _build_class():
    import torch

    vllm, missing = _resolve()
    if missing:  # register() checked; a direct import of the class gets the same message
        raise ImportError(f"this vLLM lacks {', '.join(missing)}")

    class LastTokenRows(vllm["SequencePooler"]):
        """Last-token pooling, answered in the per-token shape: one row per text."""

        def forward(self, hidden_states, pooling_metadata):
            out = super().forward(hidden_states, pooling_metadata)
            if isinstance(out, torch.Tensor):
                return out.reshape(out.shape[0], 1, -1)
            return [None if t is None else t.reshape(1, -1) for t in out]

    class PolarInternLM2ForRewardModel(vllm["InternLM2ForRewardModel"]):
        """vLLM's POLAR model with ``classify`` (last token) beside ``token_classify`` (every token).

        The forward pass already ends in the value head, so both poolers take
        its one-column output as it is (no classifier of their own); both
        honour ``use_activation``.
        """

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            config = vllm_config.model_config.pooler_config
            last = vllm["pooler_for_classify"](config)
            self.pooler = vllm["DispatchPooler"]({
                "token_classify": vllm["pooler_for_token_classify"](config),
                "classify": LastTokenRows(last.pooling, last.head),
            })

    return PolarInternLM2ForRewardModel


def __getattr__(name: str):
    # Built on first access, so importing this module needs no vLLM.
    if name == "PolarInternLM2ForRewardModel":
        cls = _build_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
