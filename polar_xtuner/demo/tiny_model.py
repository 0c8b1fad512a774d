"""A tiny, randomly initialised POLAR model and a locally built tokenizer.

The real POLAR weights and tokenizer live on the Hugging Face hub, which tests,
CI and the CPU demo cannot reach. This module writes a directory that has the
same *shape* as ``internlm/POLAR-*-Base``: an ``InternLM2ForRewardModel`` with
every field of the real config (at toy sizes), the remote code files next to
it, and a fast tokenizer with POLAR's special tokens. It loads with
``AutoModel.from_pretrained(dir, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from polar_xtuner.constants import (
    BOS_TOKEN,
    EOS_TOKEN,
    REWARD_SEP,
    REWARD_TOKEN,
    UNK_TOKEN,
)
from polar_xtuner.demo.data import corpus_for_tokenizer
from polar_xtuner.hf_layout import AUTO_MAP, copy_remote_code, model_dir_entry, text_only_transformers
from polar_xtuner.outputs import atomic_dir, check_writable_dir, refuse_replacing

# Fixed ids of the tiny tokenizer's special tokens. The real tokenizer keeps
# BOS 1 and EOS 2 as well; its reward token is 92527, ours is 4.
TINY_SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, REWARD_SEP, REWARD_TOKEN]
TINY_REWARD_TOKEN_ID = TINY_SPECIAL_TOKENS.index(REWARD_TOKEN)

_CJK = "[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"

# Toy sizes; every other field follows the real POLAR (InternLM2) config.
# Heads of 32 dimensions: the smallest size vLLM's CPU attention serves (it
# supports 32, 64, 80, ..., 256, 512), so the demo model can be served for real.
# The width is what makes the demo learn on every seed: at 128 (4 heads) one
# seed in three stalled near 0.7 held-out accuracy, at 256 none did
# (bench/README.md, "Demo robustness").
TINY_MODEL_SIZES = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,  # head size 256 / 8 = 32
    num_key_value_heads=4,  # GQA, like the real models
    max_position_embeddings=2048,
)


def _default_corpus() -> Iterable[str]:
    return corpus_for_tokenizer()


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024):
    """Train a small byte-level BPE tokenizer with POLAR's special tokens.

    Byte-level BPE has no unknown tokens, so any unicode text round-trips
    through encode/decode, as with the real tokenizer. BOS is added on encode
    and only ``input_ids`` and ``attention_mask`` are returned (the model
    rejects ``token_type_ids``).

    Args:
        corpus: Texts to learn merges from; defaults to the demo vocabulary.
        vocab_size: Total vocabulary size, special tokens included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # CJK characters stay single tokens (no merges across them), so a Chinese
    # answer is found character by character, as with the real tokenizer's
    # rarer characters; everything else is byte-level BPE.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else _default_corpus()), trainer)
    for i, t in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} is not at id {i}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # as in InternLM2: pad is </s>
        additional_special_tokens=[REWARD_SEP, REWARD_TOKEN],
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def tiny_config_dict(vocab_size: int, **overrides) -> dict:
    """Every field of the real POLAR-*-Base config, at toy sizes."""
    cfg = dict(
        architectures=["InternLM2ForRewardModel"],
        auto_map=dict(AUTO_MAP),
        model_type="internlm2",
        vocab_size=vocab_size,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        reward_token_id=TINY_REWARD_TOKEN_ID,
        tie_word_embeddings=False,
        bias=False,
        rope_theta=1000000,
        rope_scaling=None,
        pretraining_tp=1,
        attn_implementation="eager",
        torch_dtype="float32",
        **TINY_MODEL_SIZES,
    )
    cfg.update(overrides)
    return cfg


def make_tiny_model(out_dir: str, seed: int = 0, with_weights: bool = True, **config_overrides) -> str:
    """Write a tiny random POLAR reward model and its tokenizer to out_dir.

    Args:
        out_dir: Target directory (created if missing).
        seed: Seed for the random weights, so the demo is reproducible.
        with_weights: False writes config, code and tokenizer only (enough to
            build the model on the meta device, as the converter does).
        **config_overrides: Config fields to change (sizes, for example).

    Returns:
        out_dir.
    """
    import torch

    text_only_transformers()
    from transformers import AutoConfig, AutoModel

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out_dir)

    copy_remote_code(out_dir)
    vocab_size = config_overrides.pop("vocab_size", len(tokenizer))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(tiny_config_dict(vocab_size, **config_overrides), f, indent=2)
    if not with_weights:
        return out_dir
    config = AutoConfig.from_pretrained(out_dir, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained rewrites config.json; keep the remote-code map intact.
    with open(os.path.join(out_dir, "config.json")) as f:
        saved = json.load(f)
    saved["auto_map"] = dict(AUTO_MAP)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(saved, f, indent=2)
    copy_remote_code(out_dir)
    return out_dir


def write_tiny_model(out_dir: str, seed: int = 0, force: bool = False) -> None:
    """``tools/make_tiny_model.py``: the tiny model written whole into ``out_dir``, or nothing written.

    Raises:
        UserError: ``out_dir`` is not writable, or not empty without ``force``, or holds files
            other than a model directory's (``force`` replaces a model, nothing else).
    """
    check_writable_dir(out_dir, "OUT_DIR")
    refuse_replacing(out_dir, "OUT_DIR", force, model_dir_entry)
    with atomic_dir(out_dir) as tmp:  # all of it or nothing, modes by the umask
        make_tiny_model(tmp, seed=seed)
