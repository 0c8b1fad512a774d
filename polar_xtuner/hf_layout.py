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
import re
import shutil
import sys

from polar_xtuner.errors import UserError

CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
}
TRUST_FLAG = "--trust-remote-code"


def text_only_transformers() -> None:
    """Keep torchvision out of a scoring or conversion process: call before transformers' model classes import.

    transformers 4.48 imports torchvision, which imports ``torch._dynamo``, for
    its image utilities whenever it is installed (xtuner's training needs it),
    on every ``import transformers.modeling_utils``: 0.7-0.9 s of CPU at each
    start of eval_pref, the converter and make_tiny_model, which use text
    models only. Marking it unavailable before that import skips it; once
    modeling_utils is loaded (training, or a caller that imported it) this
    changes nothing.
    """
    if "transformers.modeling_utils" in sys.modules:
        return
    try:
        from transformers.utils import import_utils
    except ImportError:  # the caller's own import reports it
        return
    import_utils._torchvision_available = False


def modeling_code_dir() -> str:
    """The directory of the InternLM2 reward-model code this project ships (from xtuner).

    Found without importing xtuner, so that serving (tools/serve.sh, run by
    any python3 with the engine) checks a model's code without xtuner and
    its torch: this interpreter's xtuner, else the training venv's beside the
    package (``.venv``).

    Raises:
        UserError: Neither has xtuner; the line says what is missing.
    """
    import importlib.util
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.find_spec("xtuner")  # a top-level spec: xtuner itself is not imported
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    roots += sorted(glob.glob(os.path.join(repo, ".venv", "lib", "python3*", "site-packages", "xtuner")))
    for root in roots:
        src = os.path.join(root, "tools", "model_converters", "modeling_internlm2_reward")
        if all(os.path.isfile(os.path.join(src, n)) for n in CODE_FILES):
            return src
    raise UserError(f"cannot check a model directory's Python code: the InternLM2 code it is checked against "
                    f"comes with xtuner, which is installed neither for {sys.executable} nor in {repo}/.venv; "
                    f"run `make setup` (or install xtuner), or pass {TRUST_FLAG} to run the directory's code unchecked")


# The names a model directory written here may hold (tools/make_tiny_model.py, tools/convert.sh,
# full or --adapter): HF's model, tokenizer and PEFT files, their remote code, our
# encoding settings and model card. --force replaces a directory of these only.
_MODEL_DIR_ENTRY = re.compile(
    r"(config|generation_config|polar_encoding|adapter_config|tokenizer_config|special_tokens_map"
    r"|added_tokens|model\.safetensors\.index|adapter_model\.safetensors\.index|chat_template)\.json"
    r"|(model|adapter_model)(-\d{5}-of-\d{5})?\.safetensors"
    r"|(configuration|modeling|tokenization)_\w+\.py|__pycache__"
    r"|tokenizer\.(json|model)|vocab\.\w+|merges\.txt|README\.md|chat_template\.jinja")


def model_dir_entry(name: str) -> bool:
    """Whether ``name`` is a file a model directory written by this project may hold."""
    return _MODEL_DIR_ENTRY.fullmatch(name) is not None


def copy_remote_code(out_dir: str) -> None:
    """Copy the shipped InternLM2 reward code (config + modeling) into out_dir.

    A model directory then loads on a machine that has neither the hub nor
    the original model directory.
    """
    src = modeling_code_dir()
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))


def file_digest(path: str, digest_size: int = 32) -> str:
    """The blake2b of a file's bytes (about 1.2 GB/s on one core), read in 1 MiB chunks.

    The project's one file digest: trusted model code (32 bytes, stored in
    trusted_code.json) and the data cache's keys (16 bytes) both use it.
    """
    h = hashlib.blake2b(digest_size=digest_size)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
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


def auto_map_entries(model_dir: str) -> list[tuple[str, str, str]]:
    """Every ``auto_map`` entry of every JSON config file of a directory: ``(file, auto class, reference)``.

    transformers runs the code an entry names when a model or tokenizer is
    loaded with ``trust_remote_code``: ``module.Class`` (``module.py`` in the
    directory), or ``repo_or_path--module.Class`` (code from another repository
    or directory). ``config.json``, ``tokenizer_config.json`` and the others all
    count; an entry that is not a string is kept as its JSON.
    """
    out = []
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(model_dir, name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # not a config transformers could read either; the loader names it
        amap = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(amap, dict):
            continue
        for auto_class, refs in amap.items():
            for ref in refs if isinstance(refs, list) else [refs]:
                if ref is not None:
                    out.append((name, str(auto_class), ref if isinstance(ref, str) else json.dumps(ref)))
    return out


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _module_file(model_dir: str, ref: str) -> str | None:
    """The file an in-directory ``module.Class`` reference runs, or None where it names code elsewhere."""
    if "--" in ref or "." not in ref:
        return None
    module = ref.rsplit(".", 1)[0]
    if not _MODULE.fullmatch(module):
        return None
    return os.path.join(model_dir, *module.split(".")) + ".py"


def untrusted_code(model_dir: str) -> list[str]:
    """What a local model directory would run that is not trusted code, each named, sorted.

    The directory's Python files not trusted by digest, every module an
    ``auto_map`` entry names inside it (a subfolder's included) that is not,
    and every entry that names code outside it (``file: auto_map.Class = ref``).
    """
    files = set(glob.glob(os.path.join(model_dir, "*.py")))
    outside = []
    for name, auto_class, ref in auto_map_entries(model_dir):
        path = _module_file(model_dir, ref)
        if path is None:
            outside.append(f"{name}: auto_map.{auto_class} = {ref!r}, code outside {model_dir}")
        elif os.path.isfile(path):
            files.add(path)
    if not files and not outside:
        return outside
    trusted = trusted_digests()
    local = sorted(os.path.relpath(p, model_dir) for p in files if file_digest(p) not in trusted)
    return local + outside


def remote_code_allowed(path: str, trust_remote_code: bool = False, flag: str = TRUST_FLAG) -> bool:
    """The ``trust_remote_code`` value to load ``path`` with.

    A local directory whose Python files, and every module its config files'
    ``auto_map`` entries name, are trusted code: True. With other code, or an
    entry naming code outside the directory: True only when the user passed
    the flag (a note says what will run); otherwise an error. A hub name: the flag's value (the hub's
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
    raise UserError(f"{path} names Python code this project did not ship ({'; '.join(unknown)}), which loading "
                    f"the model would run; inspect it, then pass {flag} to allow it")


TRUST_ENV = "POLAR_TRUST_REMOTE_CODE"


def refuse_untrusted_code(path: str, what: str) -> None:
    """Inside ``xtuner train``: refuse a model directory that would run code this project cannot vouch for.

    The same rule as the tools' (:func:`untrusted_code`: every ``auto_map``
    entry resolved, code outside the directory or not trusted by digest). A
    config's ``trust_remote_code=True`` is the shipped default, not a user's
    consent, and ``xtuner train`` takes no flag of ours: ``POLAR_TRUST_REMOTE_CODE=1``
    is the consent.

    Raises:
        UserError: naming the directory, the files and the entries.
    """
    if not isinstance(path, str) or not os.path.isdir(path):
        return
    try:  # the tools' rule, with the variable for the flag
        remote_code_allowed(path, os.environ.get(TRUST_ENV) == "1", f"{TRUST_ENV}=1")
    except UserError as e:
        raise UserError(f"{what} {e}") from None


def check_model_dir(path: str, flag: str = "--model", weights: bool = True) -> None:
    """Refuse a model directory that is missing a piece, before anything loads from it.

    A directory needs config.json (or adapter_config.json for a LoRA adapter
    directory), a tokenizer (tokenizer_config.json with tokenizer.json or a
    SentencePiece model) and, with ``weights``, weights (safetensors or
    PyTorch, or an index of shards whose every shard exists).

    Raises:
        UserError: naming the directory and what is missing, or the weight
            file that is truncated; a training work dir, with what to do.
    """
    problem = training_run_problem(path, f"{flag} {path}")
    if problem:
        raise UserError(problem)
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
    check_files_whole(path, flag, weights=weights)


def hub_unreachable(name, what: str, e: OSError) -> UserError:
    """One line for a model name that is no local directory and that the hub did not give.

    On an offline cluster transformers answers ``from_pretrained("internlm/POLAR-7B-Base")``
    with a long OSError about connecting to huggingface.co; this says what to do.
    """
    if isinstance(name, str) and os.path.exists(name):
        return UserError(f"{what} {name}: cannot load it ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    return UserError(f"{what} {name!r} is not a local directory, and the Hugging Face hub did not give it "
                     f"(offline, or no such model); download it where the hub is reachable "
                     f"(huggingface-cli download {name} --local-dir DIR) and give DIR instead "
                     f"(pretrained_model_name_or_path in a config)")


def load_failure(path: str, what: str, e: Exception, flag: str = "--model") -> UserError:
    """One line for a model directory whose files are present but do not load."""
    return UserError(f"{flag} {path}: its {what} does not load ({type(e).__name__}: {str(e)[:300]}); a file is "
                     f"damaged or truncated: convert it again")


def training_run_problem(path: str, label: str) -> str | None:
    """The line refusing a training work dir or checkpoint where a converted model is needed; None otherwise.

    Transformers' own error for such a directory is 500 characters about the
    hub, and the code check would advise ``--trust-remote-code`` for the
    config copy xtuner keeps there; neither says that the run must be
    converted first.

    Args:
        path: What the user gave.
        label: How the user gave it (``"--tokenizer PATH"``, ``"POLAR_MODEL=PATH"``).
    """
    if os.path.isfile(path) and path.endswith((".pth", ".pt")):
        found = "a training checkpoint file"
    elif os.path.isdir(path):
        names = set(os.listdir(path))
        if {"config.json", "adapter_config.json"} & names:
            return None
        if "last_checkpoint" in names or any(n.startswith("iter_") and n.endswith(".pth") for n in names):
            found = "a training work dir (it has last_checkpoint / iter_*.pth)"
        elif any(n.endswith("model_states.pt") for n in names):
            found = "a DeepSpeed training checkpoint (it has *model_states.pt)"
        else:
            return None
    else:
        return None
    return (f"{label} is {found}, not a model directory; convert it first with tools/convert.sh "
            f"(bash tools/convert.sh CONFIG {path} OUT_DIR) and use OUT_DIR")


JSON_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(path: str) -> list[str]:
    """The weight files of a model or adapter directory (safetensors, or PyTorch .bin), sorted."""
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.endswith(".safetensors") or (n.endswith(".bin") and n.startswith(("pytorch_model",
                                                                                          "adapter_model"))))


def check_files_whole(path: str, flag: str = "--model", fix: str = "convert it again with tools/convert.sh",
                      weights: bool = True) -> None:
    """Refuse a model directory with a file cut short, naming that file (no tensor is read).

    Checked: the JSON files (config, tokenizer, index) parse, and each weight
    file's layout fits its size (:func:`file_damage`).

    Raises:
        UserError: ``<flag> <dir>: <file> is truncated or damaged (<why>); <fix>``.
    """
    for name in JSON_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"{flag} {path}: {file} is truncated or damaged (not JSON: {str(e)[:120]}); "
                                f"{fix}") from None
    for file in weight_files(path) if weights else []:
        reason = file_damage(file)
        if reason:
            raise UserError(f"{flag} {path}: {file} is truncated or damaged ({reason}); {fix}")


def file_damage(path: str) -> str | None:
    """Why a weight or checkpoint file cannot be whole, or None when its layout holds together.

    Cheap: a safetensors header, or the zip directory of a ``torch.save``
    file, is checked against the file's size; no tensor is read. A file cut
    short (a copy or a save that did not finish) is always caught; damage
    inside the data is left to the loader.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "an empty file"
        with open(path, "rb") as f:
            if path.endswith(".safetensors"):
                return _safetensors_damage(f, size)
            return _torch_file_damage(f, size)
    except OSError as e:
        return f"cannot read it: {e.strerror}"


def _safetensors_damage(f, size: int) -> str | None:
    if size < 8:
        return f"{size} bytes, less than a safetensors header"
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        return f"its header claims {n} bytes, the file holds {size - 8} after the length: it is cut short"
    try:
        header = json.loads(f.read(n))
        need = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "its header is not safetensors metadata"
    data = size - 8 - n
    if need > data:
        return f"its tensors need {need} bytes of data, the file holds {data}: it is cut short"
    return None


def _torch_file_damage(f, size: int) -> str | None:
    import zipfile

    if f.read(4) != b"PK\x03\x04":
        return None  # torch's legacy (pre-1.6) format: only loading it can tell
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        return "its zip directory, at the end of the file, is missing or damaged: it is cut short"
    for info in infos:
        if info.header_offset + info.compress_size > size:
            return f"its record {info.filename} ends past the end of the file: it is cut short"
    return None
