"""The Hugging Face directory layout of a POLAR model, and which code in it may run.

InternLM2 is not part of transformers 4.48, so a POLAR directory carries its
modeling code (``configuration_internlm2.py``, ``modeling_internlm2.py``),
named by ``auto_map``, and loading it means running that code. This project
ships that code (xtuner's InternLM2 reward-model files) and the converter
copies it into every model it writes. :func:`remote_code_allowed` lets a
directory's code run only when every Python file in it is byte-for-byte code
we trust (checked by hash), or when the user passed ``--trust-remote-code``:
a planted ``modeling_*.py`` never runs by default.

Trusted code is the shipped code, plus the remote code of tokenizers the
converter copied from the base model the user trained (their digests are kept
in a per-user list, ``$POLAR_XTUNER_HOME/trusted_code.json``, outside any model
directory, so a directory cannot vouch for itself).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

from .errors import UserError

CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
}
TRUST_FLAG = "--trust-remote-code"


def modeling_code_dir() -> str:
    """The directory of the InternLM2 reward-model code this project ships (from xtuner)."""
    from xtuner.tools.model_converters import modeling_internlm2_reward

    return os.path.dirname(modeling_internlm2_reward.__file__)


def copy_remote_code(out_dir: str) -> None:
    """Copy the shipped InternLM2 reward code (config + modeling) into out_dir.

    A model directory then loads on a machine that has neither the hub nor
    the original model directory.
    """
    src = modeling_code_dir()
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store_path() -> str:
    home = os.environ.get("POLAR_XTUNER_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "polar_xtuner")
    return os.path.join(home, "trusted_code.json")


def _stored_digests() -> set[str]:
    try:
        with open(_store_path(), encoding="utf-8") as f:
            return set(json.load(f).get("blake2b", []))
    except (OSError, ValueError, AttributeError):
        return set()


def trusted_digests() -> set[str]:
    """Digests of the code that may run without the flag."""
    src = modeling_code_dir()
    return {file_digest(os.path.join(src, n)) for n in CODE_FILES} | _stored_digests()


def remember_code(model_dir: str) -> None:
    """Add the Python files of a directory the converter wrote to the user's trusted list.

    The converter calls this for code it copied itself (the base model's
    tokenizer code, which the training config already trusted).
    """
    known = _stored_digests()
    new = {file_digest(p) for p in glob.glob(os.path.join(model_dir, "*.py"))} - known
    if not new:
        return
    path = _store_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"blake2b": sorted(known | new)}, f, indent=1)
    os.replace(tmp, path)


def untrusted_code(model_dir: str) -> list[str]:
    """Python files of a local model directory that are not trusted code (names, sorted)."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.py")))
    if not files:
        return []
    trusted = trusted_digests()
    return [os.path.basename(p) for p in files if file_digest(p) not in trusted]


def remote_code_allowed(path: str, trust_remote_code: bool = False, flag: str = TRUST_FLAG) -> bool:
    """The ``trust_remote_code`` value to load ``path`` with.

    A local directory whose Python files are all trusted code: True. With
    other code: True only when the user passed the flag (a note says what
    will run); otherwise an error. A hub name: the flag's value (the hub's
    own code is the user's choice).

    Raises:
        UserError: The directory holds code we did not ship and the flag was not given.
    """
    if not os.path.isdir(path):
        return bool(trust_remote_code)
    unknown = untrusted_code(path)
    if not unknown:
        return True
    if trust_remote_code:
        import sys

        print(f"note: {flag}: running {', '.join(unknown)} from {path}", file=sys.stderr)
        return True
    raise UserError(f"{path} holds Python code this project did not ship ({', '.join(unknown)}), which loading "
                    f"the model would run; inspect it, then pass {flag} to allow it")


def check_model_dir(path: str, flag: str = "--model", weights: bool = True) -> None:
    """Refuse a model directory that is missing a piece, before anything loads from it.

    A directory needs config.json (or adapter_config.json for a LoRA adapter
    directory), a tokenizer (tokenizer_config.json with tokenizer.json or a
    SentencePiece model) and, with ``weights``, weights (safetensors or
    PyTorch, or an index of shards whose every shard exists).

    Raises:
        UserError: naming the directory and what is missing.
    """
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    have = set(os.listdir(path))
    missing = []
    adapter = "adapter_config.json" in have
    if not adapter and "config.json" not in have:
        missing.append("config.json")
    if "tokenizer_config.json" not in have:
        missing.append("tokenizer_config.json")
    elif not ({"tokenizer.json", "tokenizer.model"} & have):
        missing.append("tokenizer.json or tokenizer.model")
    if weights:
        names = ("adapter_model.safetensors", "adapter_model.bin") if adapter else (
            "model.safetensors", "pytorch_model.bin")
        index = next((n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if n in have), None)
        if index and not adapter:
            try:
                with open(os.path.join(path, index), encoding="utf-8") as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{flag} {path}: {index} is unreadable ({e}); the directory is damaged, "
                                f"convert again") from None
            missing += sorted(shards - have)
        elif not set(names) & have:
            missing.append(" or ".join(names))
    if not {"config.json", "adapter_config.json", "tokenizer_config.json"} & have:
        raise UserError(f"{flag} {path}: not a model directory (no config.json or tokenizer_config.json); "
                        f"pass a directory written by tools/convert.sh")
    if missing:
        raise UserError(f"{flag} {path}: incomplete model directory, missing {', '.join(missing)}; convert it "
                        f"again with tools/convert.sh (which writes a directory whole or not at all)")


def load_failure(path: str, what: str, e: Exception, flag: str = "--model") -> UserError:
    """One line for a model directory whose files are present but do not load."""
    return UserError(f"{flag} {path}: its {what} does not load ({type(e).__name__}: {str(e)[:300]}); a file is "
                     f"damaged or truncated: convert it again")
