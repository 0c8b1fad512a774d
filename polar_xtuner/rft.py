"""POLAR as the reward in reinforcement fine-tuning: verl and OpenRLHF reward functions.

Point the RL framework at this module; it scores each response against the
row's reference on a served POLAR model (``tools/serve.sh``), with the same
encoding as training and ``tools/eval_pref.py``:

* verl >= 0.9 (reward loop, per sample):
  ``reward.custom_reward_function.path=pkg://polar_xtuner.rft``
  ``reward.custom_reward_function.name=compute_score``. ``compute_score`` is a
  coroutine: verl awaits every sample of a batch at once, and the calls are
  gathered into a few large requests instead of one request per response.
  When verl serves the reward model itself it passes
  ``reward_router_address`` (and ``reward_model_tokenizer``); the score then
  goes through that router and no separate server is needed.
* verl's batch reward manager (POLAR's published recipe, verl 0.5):
  ``custom_reward_function.name=compute_score_batch``.
* OpenRLHF >= 0.11: ``--reward.remote_url /abs/path/polar_xtuner/rft.py``
  loads :func:`reward_func` (the label carries the raw prompt and reference,
  see :func:`parse_label`).

Settings come from the environment (no code edits), or from a JSON file named
by ``POLAR_CONFIG`` whose keys are the lower-case names without ``POLAR_``
(the environment wins over the file):

========================  ====================================================
``POLAR_SERVER_TYPE``     vllm (default), sglang or lmdeploy
``POLAR_SERVER_ADDRESS``  HOST:PORT of a server or a fleet's router
                          (``tools/serve.sh --replicas N``), or several
                          comma-separated; each prompt's rollouts on one server
``POLAR_ROUTING``         prefix (default): a prompt's rollouts on one replica;
                          round_robin: each to the next replica (a baseline)
``POLAR_MODEL``           the converted model dir: tokenizer, the encoding
                          lengths it was trained with, its score statistics
``POLAR_STRIP_THINKING``  1 (default): drop ``<think>...</think>`` from responses
``POLAR_NORMALIZE``       1: (score - mean) / std with the statistics that
                          ``tools/eval_pref.py --write-stats`` saved in the model dir
``POLAR_FALLBACK_SCORE``  a number to use when scoring fails (default: raise);
                          every use is logged and counted
``POLAR_TIMEOUT``, ``POLAR_MAX_RETRIES``, ``POLAR_BATCH_SIZE``,
``POLAR_BATCH_TOKENS``,   as in ``tools/eval_pref.py``'s remote scoring
``POLAR_CONCURRENCY``
========================  ====================================================

In verl the same settings can travel in the trainer's own config, which
reaches the Ray workers whatever their environment:
``+reward.custom_reward_function.reward_kwargs.polar_server_address=HOST:PORT``
(any setting, as ``polar_<name>``).

A failure never turns into ``None``: it raises with the server's answer,
unless a fallback score was asked for.
"""

# Loaded by path, this file is a module outside the package: it only re-exports
# the package's implementation, with absolute imports.
from polar_xtuner.constants import STATS_FILE  # noqa: F401
from polar_xtuner.rl.reward import (  # noqa: F401
    END_MARKERS,
    PolarReward,
    RFTConfigError,
    RFTSettings,
    compute_score,
    compute_score_batch,
    forget_rewards,
    get_reward,
    loaded_rewards,
    parse_label,
    response_of,
    reward_func,
    reward_stats,
    strip_thinking,
)

__all__ = ["compute_score", "compute_score_batch", "reward_func", "RFTSettings", "RFTConfigError",
           "PolarReward", "STATS_FILE", "parse_label", "response_of", "strip_thinking", "reward_stats",
           "get_reward", "loaded_rewards", "forget_rewards"]
