"""The data and models the timed sections share: lengths, pairs, records and model shapes.

Every section builds its work here, so that two sections which say they time
"chat-like pairs" or "the tiny model" time the same thing:

* :func:`chat_like_lengths` and :func:`synthetic_pairs`: long-tailed pair
  lengths and random-id pair features (packing, training and GPU scoring);
* :func:`demo_vocab`, :func:`long_records`, :func:`rollout_groups`: demo
  records made long, and RL-shaped groups of rollouts (remote scoring);
* :func:`shared_prefix_records`: the shared-prefix section's workloads;
* :data:`SHAPES`, :func:`model_dir` and :func:`reward_model`: a model
  directory of a named shape (random weights, no download) and the training
  model built from it as the configs build it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from bench import REPO
from polar_xtuner.data.formats import from_ranked
from polar_xtuner.demo.data import TOPICS, generate
from polar_xtuner.demo.tiny_model import make_tiny_model
from polar_xtuner.records import load_records
from polar_xtuner.train.model import PolarRewardModel

# Model shapes by name: POLAR-1.8B's real dimensions, a 0.5B one of the same family, POLAR-7B's
# layer at its width with 16 of its 32 layers (what one GPU holds with ZeRO-2's optimizer states:
# bench/gpu_steps.py, step train_7b), and the demo's tiny model ({}: make_tiny_model's own sizes).
SEVEN_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768)
SHAPES = {
    "7b_16_layers": dict(SEVEN_B, num_hidden_layers=16),
    "1.8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768),
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768),
    "tiny": {},
    # The fleet benchmark's: the tiny tokenizer and family, wide enough that a token's compute outweighs
    # vLLM's handling of it on CPU (with "tiny", request handling is most of a replica's time).
    "fleet_small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                        num_key_value_heads=12),
}

# The shared-prefix section's workloads (:func:`shared_prefix_records`).
SHARED_PREFIX_WORKLOADS = ("demo", "long_reference", "ranked5")


def model_dir(path: str, shape: str = "tiny", with_weights: bool = True) -> str:
    """A model directory of ``shape`` (:data:`SHAPES`) at ``path``, random weights, the tiny tokenizer."""
    return make_tiny_model(path, with_weights=with_weights, **SHAPES[shape])


def reward_model(model_path: str, varlen: bool, **settings) -> PolarRewardModel:
    """The training model over ``model_path`` (seed 0), as the configs build it, in train mode.

    ``settings`` go to :meth:`PolarRewardModel.from_model_dir` (activation
    checkpointing is off unless given: the sections compare layouts, not memory).
    """
    torch.manual_seed(0)
    kw = {"loss_type": "ranking", "penalty_type": "none", "use_activation_checkpointing": False, **settings}
    return PolarRewardModel.from_model_dir(model_path, use_varlen_attn=varlen, **kw).train()


def chat_like_lengths(n: int, max_length: int, seed: int = 0) -> list[tuple[int, int]]:
    """(chosen, rejected) token lengths: shared prompt+reference, long-tailed answers."""
    rng = np.random.default_rng(seed)
    shared = np.clip(rng.lognormal(5.0, 1.0, n), 16, max_length // 2).astype(int)
    a = np.clip(rng.lognormal(5.0, 1.1, n), 4, max_length // 2).astype(int)
    b = np.clip(rng.lognormal(5.0, 1.1, n), 4, max_length // 2).astype(int)
    return [(int(s + x), int(s + y)) for s, x, y in zip(shared, a, b)]


def synthetic_pairs(lengths, vocab_size: int, reward_token_id: int, seed: int = 0) -> list[dict]:
    """Pair features with the given token lengths (random ids, reward token last)."""
    rng = np.random.default_rng(seed)
    out = []
    for c, r in lengths:
        ids = [rng.integers(5, vocab_size, n - 1).tolist() + [reward_token_id] for n in (c, r)]
        out.append({"chosen_ids": ids[0], "rejected_ids": ids[1],
                    "chosen_labels": [-100] * (c - 1) + [0], "rejected_labels": [-100] * (r - 1) + [1]})
    return out


def pair_tokens(features) -> int:
    """Tokens of pair features (:func:`synthetic_pairs`), both sequences of each."""
    return sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)


def demo_vocab() -> list[str]:
    """The demo answers' ASCII words, sorted: the vocabulary the synthetic long texts are drawn from."""
    return sorted({w for answers, *_ in TOPICS.values() for w in answers if w.isascii()})


def _say(rng: random.Random, vocab: list[str], words: int) -> str:
    # about one token per word with the tiny tokenizer's word-level vocabulary
    return " ".join(rng.choice(vocab) for _ in range(words))


def long_records(n: int, seed: int, words: int = 300) -> list[dict]:
    """Demo records made long, each with a prompt and reference of its own.

    Every prompt opens with a context of ``words`` random words and every
    reference with a reasoning of ``words // 2``, drawn per record, so two
    records share no more than the start of the template, and only a pair's
    chosen and rejected texts share a long prefix, as an RL prompt's
    rollouts do. About 780 tokens per text with the tiny tokenizer.
    """
    rng, vocab = random.Random(seed), demo_vocab()
    out = []
    for rec in generate(n, seed):  # fresh records: edited in place
        context, reasoning = _say(rng, vocab, words), _say(rng, vocab, words // 2)
        rec["prompt"][-1]["content"] = f"Context: {context}. {rec['prompt'][-1]['content']}"
        rec["reference"][-1]["content"] = f"Reasoning: {reasoning}. {rec['reference'][-1]['content']}"
        out.append(rec)
    return out


def rollout_groups(n_prompts: int, n_rollouts: int, seed: int, words: int = 200) -> tuple[list, list, list]:
    """RL-shaped scoring work: ``n_rollouts`` responses per prompt, all against its reference.

    As in a GRPO step, the rollouts of one prompt share the whole
    ``prompt + reference + prompt`` part of their texts and differ only in
    the response. Each prompt opens with ``words`` random words of context,
    its reference with ``words // 3`` of reasoning and each response with
    ``words // 3`` of its own; about 600 tokens per text with the tiny
    tokenizer. Returns flat (prompts, references, responses), a prompt's
    rollouts next to each other, the order an RL batch arrives in.
    """
    rng, vocab = random.Random(seed), demo_vocab()
    prompts, references, responses = [], [], []
    for rec in generate(n_prompts, seed):
        prompt = [{"role": "user", "content": f"Context: {_say(rng, vocab, words)}. {rec['prompt'][-1]['content']}"}]
        reference = [{"role": "assistant",
                      "content": f"Reasoning: {_say(rng, vocab, words // 3)}. {rec['reference'][-1]['content']}"}]
        for i in range(n_rollouts):
            answer = rec["chosen" if i % 2 else "rejected"][-1]["content"]
            prompts.append(prompt)
            references.append(reference)
            responses.append(f"{_say(rng, vocab, words // 3)}. {answer}")
    return prompts, references, responses


def shared_prefix_records(name: str, n: int, seed: int = 0) -> list[dict]:
    """A shared-prefix workload's validated pair records (``n``: prompts, or pairs for ``demo``).

    ``demo``: the demo's training pairs, which repeat prompts. ``long_reference``:
    prompts of about 200 tokens, references of about 800, candidates of about
    400, one pair per prompt. ``ranked5``: ranked records of five responses of
    about 150 tokens; the best is the reference, the other four give six pairs.
    """
    if name == "demo":
        return load_records(os.path.join(REPO, "data", "demo", "train.jsonl"))[:n]
    if name not in SHARED_PREFIX_WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (workloads: {', '.join(SHARED_PREFIX_WORKLOADS)})")
    rng, vocab = random.Random(seed), demo_vocab()
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: {_say(rng, vocab, 200)}"}]
        if name == "long_reference":
            out.append({"prompt": prompt, "reference": [{"role": "assistant", "content": _say(rng, vocab, 800)}],
                        "chosen": [{"role": "assistant", "content": _say(rng, vocab, 400)}],
                        "rejected": [{"role": "assistant", "content": _say(rng, vocab, 400)}]})
        else:
            responses = [{"response": _say(rng, vocab, 150), "score": float(5 - k)} for k in range(5)]
            out += list(from_ranked({"prompt": prompt[0]["content"], "responses": responses}))
    return out
