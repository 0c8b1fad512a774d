"""The shipped recipes differ from their reference only where a recipe means to (no drift).

Each config is parsed with ``ast`` (nothing is imported or run) into its
top-level statements in order, each tagged with the PART section (1-5) it
sits in. Against the family's reference config:

* the statements, their order and their sections are the same;
* every statement is the same, except a PART 1 setting named in ``ALLOWED``
  for that config (the list below says why each may differ);
* a recipe kind (LoRA, QLoRA) adds exactly its own settings, imports and
  model keywords, and those are the same in every config of the family that
  has them.

The PART 2-5 statements are compared as written, with the settings' names in
them rather than their values: every value is compared once, where PART 1
sets it, and a hard-coded value that bypasses a setting in one recipe shows
up as a difference in structure. So a change to a shared part of one recipe
(a hook, a dataloader argument, the scheduler, a default) fails here until
every recipe of the family has it, or ``ALLOWED`` says why not.
"""
import ast
import os
import re

import pytest

from common import REPO

CONFIG_DIR = os.path.join(REPO, "configs")

# family -> (reference config, {other config: recipe kind})
FAMILIES = {
    "gpu": ("POLAR_1_8B_full_varlenattn_custom_dataset.py", {
        "POLAR_7B_full_varlenattn_custom_dataset.py": "full",
        "POLAR_7B_full_varlenattn_sp4_custom_dataset.py": "full",
        "POLAR_1_8B_policy_discrimination_pretrain.py": "full",
        "POLAR_1_8B_lora_varlenattn_custom_dataset.py": "lora",
        "POLAR_7B_lora_varlenattn_custom_dataset.py": "lora",
        "POLAR_7B_qlora_varlenattn_custom_dataset.py": "qlora",
    }),
    # The CPU demo configs are their own family: fp32 OptimWrapper, gloo, the
    # evaluation hook always on, toy lengths (see the tiny configs' header).
    "tiny": ("POLAR_tiny_full_varlenattn_demo.py", {
        "POLAR_tiny_lora_varlenattn_demo.py": "lora",
    }),
}

# PART 1 settings a recipe may set to its own value: name -> the configs that do, and why.
ALLOWED = {
    # the base model: POLAR-7B-Base for the 7B recipes
    "pretrained_model_name_or_path": {
        "POLAR_7B_full_varlenattn_custom_dataset.py", "POLAR_7B_full_varlenattn_sp4_custom_dataset.py",
        "POLAR_7B_lora_varlenattn_custom_dataset.py", "POLAR_7B_qlora_varlenattn_custom_dataset.py"},
    # published 7B fine-tuning lr 2e-5; LoRA ~10x full tuning; policy discrimination: the paper's 1.4e-5
    # (the tiny LoRA demo keeps the tiny full demo's rate: bench/README.md, "LoRA on the demo")
    "lr": {
        "POLAR_7B_full_varlenattn_custom_dataset.py", "POLAR_7B_full_varlenattn_sp4_custom_dataset.py",
        "POLAR_1_8B_lora_varlenattn_custom_dataset.py", "POLAR_7B_lora_varlenattn_custom_dataset.py",
        "POLAR_7B_qlora_varlenattn_custom_dataset.py", "POLAR_1_8B_policy_discrimination_pretrain.py"},
    # sp4: 4x the lengths (a row split over 4 ranks); policy discrimination: the paper's prefix/answer lengths
    "max_length": {"POLAR_7B_full_varlenattn_sp4_custom_dataset.py",
                   "POLAR_1_8B_policy_discrimination_pretrain.py"},
    # sp4: 4x the response length (policy discrimination keeps 4096, the paper's answer length)
    "max_response_length": {"POLAR_7B_full_varlenattn_sp4_custom_dataset.py"},
    # the long-context recipe's 4-way Ulysses split
    "sequence_parallel_size": {"POLAR_7B_full_varlenattn_sp4_custom_dataset.py"},
    # shared prefixes are refused with sequence parallel (polar_xtuner/train/model.py)
    "shared_prefix": {"POLAR_7B_full_varlenattn_sp4_custom_dataset.py"},
    # policy discrimination trains on triples built by tools/build_dataset.py --from policies
    "data_files": {"POLAR_1_8B_policy_discrimination_pretrain.py"},
    # policy discrimination: ~1940 triples per optimizer step on 32 GPUs (the paper's global batch)
    "accumulative_counts": {"POLAR_1_8B_policy_discrimination_pretrain.py"},
}

# What each recipe kind adds to its family's reference: PART 1 settings, model keywords
# (as "model.<kw>" / "model.llm.<kw>") and imported names. Their values must agree within a family.
LORA_SETTINGS = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "model.lora"}
KIND_EXTRAS = {
    "full": (set(), set()),
    "lora": (LORA_SETTINGS, {"peft.LoraConfig"}),
    # QLoRA: the frozen base in 4 bits, loaded in bf16 with a BitsAndBytesConfig
    "qlora": (LORA_SETTINGS | {"qlora_quant_type", "qlora_double_quant", "model.llm.torch_dtype",
                               "model.llm.quantization_config"},
              {"peft.LoraConfig", "torch", "transformers.BitsAndBytesConfig"}),
}
# Keywords lifted out of `model = dict(...)` into their own entries, so the kinds can add them.
MODEL_KEYWORDS = {"lora"}
LLM_KEYWORDS = {"torch_dtype", "quantization_config"}

PART = re.compile(r"^#\s+PART (\d)\s")


class Parsed:
    """A config's statements: ``order`` [(part, key)], ``values`` {key: ast dump}, ``imports``, ``source``."""

    def __init__(self, source: str):
        self.source = source
        banners = [(i + 1, int(m.group(1))) for i, line in enumerate(source.splitlines())
                   if (m := PART.match(line))]
        assert [p for _, p in banners] == [1, 2, 3, 4, 5], "expected the five PART banners, in order"
        self.order, self.values, self.imports = [], {}, set()
        for stmt in ast.parse(source).body:
            part = max((p for line, p in banners if line < stmt.lineno), default=0)
            if isinstance(stmt, ast.ImportFrom):
                self.imports |= {f"{stmt.module}.{a.name}" for a in stmt.names}
                continue
            if isinstance(stmt, ast.Import):
                self.imports |= {a.name for a in stmt.names}
                continue
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                key, value = stmt.targets[0].id, stmt.value
                if key == "model":
                    value = self._lift_model_keywords(value, part)
            elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
                key, value = f"{stmt.target.id} {type(stmt.op).__name__}=", stmt.value
            else:  # if / del / anything else: the whole statement is its own key
                key, value = f"<{ast.unparse(stmt)}>", stmt
            assert key not in self.values, f"{key} assigned twice at the top level"
            self.order.append((part, key))
            self.values[key] = ast.dump(value)

    def _lift_model_keywords(self, call, part):
        assert isinstance(call, ast.Call), "model must be a dict(...) call"
        call = ast.parse(ast.unparse(call), mode="eval").body  # a copy to edit
        for kw in list(call.keywords):
            if kw.arg in MODEL_KEYWORDS:
                self._lift(call, kw, f"model.{kw.arg}", part)
            elif kw.arg == "llm" and isinstance(kw.value, ast.Call):
                for inner in list(kw.value.keywords):
                    if inner.arg in LLM_KEYWORDS:
                        self._lift(kw.value, inner, f"model.llm.{inner.arg}", part)
        return call

    def _lift(self, call, kw, key, part):
        call.keywords.remove(kw)
        self.order.append((part, key))
        self.values[key] = ast.dump(kw.value)

    def setting(self, key: str) -> str:
        """The source text of a PART 1 setting's value (for messages)."""
        node = ast.parse(self.source)
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == key:
                return ast.unparse(stmt.value)
        return "?"


def _parsed(name) -> Parsed:
    with open(os.path.join(CONFIG_DIR, name), encoding="utf-8") as f:
        return Parsed(f.read())


def drift(reference: Parsed, config: Parsed, name: str, kind: str) -> list[str]:
    """Every difference of ``config`` from ``reference`` that neither ALLOWED nor its kind explains."""
    extra_settings, extra_imports = KIND_EXTRAS[kind]
    problems = []
    keys = {key for _, key in config.order}
    if keys & extra_settings != extra_settings:
        problems.append(f"missing what a {kind} recipe adds: {sorted(extra_settings - keys)}")
    order = [(part, key) for part, key in config.order if key not in extra_settings]
    if order != reference.order:
        ref_keys = [key for _, key in reference.order]
        only_ref = [k for k in ref_keys if k not in keys]
        only_cfg = [k for _, k in order if k not in ref_keys]
        moved = [(p, k) for p, k in order if k in ref_keys and (p, k) not in reference.order]
        problems.append(f"statements differ: only in the reference {only_ref}, only here {only_cfg}, "
                        f"in another PART {moved}, or in another order")
    if config.imports - extra_imports != reference.imports:
        problems.append(f"imports differ: only here {sorted(config.imports - extra_imports - reference.imports)}, "
                        f"only in the reference {sorted(reference.imports - config.imports)}")
    for key, value in config.values.items():
        if key in extra_settings or key not in reference.values or value == reference.values[key]:
            continue
        if name in ALLOWED.get(key, ()):
            part = dict((k, p) for p, k in config.order)[key]
            if part != 1:
                problems.append(f"{key} is allowed to differ only as a PART 1 setting")
            continue
        shown = config.setting(key) if not key.startswith("<") else key
        problems.append(f"{key} differs from the reference ({shown} vs {reference.setting(key)}) "
                        "and is not in ALLOWED for this config")
    return problems


CASES = [(family, ref, name, kind) for family, (ref, others) in FAMILIES.items() for name, kind in others.items()]


def test_every_shipped_config_is_in_a_family():
    named = {ref for ref, _ in FAMILIES.values()} | {n for _, others in FAMILIES.values() for n in others}
    shipped = {n for n in os.listdir(CONFIG_DIR) if n.endswith(".py")}
    assert named == shipped, f"add {sorted(shipped - named)} to FAMILIES; gone: {sorted(named - shipped)}"


@pytest.mark.parametrize("family, reference, name, kind", CASES, ids=[c[2] for c in CASES])
def test_config_differs_from_its_reference_only_where_allowed(family, reference, name, kind):
    problems = drift(_parsed(reference), _parsed(name), name, kind)
    assert not problems, f"{name} vs {reference}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_what_a_kind_adds_is_the_same_in_each_config_of_a_family(family):
    _, others = FAMILIES[family]
    parsed = {name: _parsed(name) for name in others}
    for key in set().union(*(KIND_EXTRAS[kind][0] for kind in others.values())):
        values = {name: parsed[name].values[key] for name, kind in others.items() if key in KIND_EXTRAS[kind][0]}
        assert len(set(values.values())) == 1, f"{key} differs between {sorted(values)}"


def test_every_allowance_is_used():
    """ALLOWED stays as tight as the recipes: each listed config really sets its own value."""
    refs = {name: ref for ref, others in FAMILIES.values() for name in others}
    unused = [(key, name) for key, names in ALLOWED.items() for name in sorted(names)
              if _parsed(name).values[key] == _parsed(refs[name]).values[key]]
    assert not unused, f"remove these from ALLOWED (same as the reference): {unused}"


@pytest.mark.parametrize("edit, expected", [
    (("warmup_ratio = 0.03", "warmup_ratio = 0.05"), "warmup_ratio differs"),
    (("    shuffle_before_pack=True,", "    shuffle_before_pack=False,"), "train_dataset differs"),
    (("log_level = \"INFO\"\n", "log_level = \"INFO\"\nextra = 1\n"), "only here ['extra']"),
    (("lr = 2e-5", "lr = 3e-5"), None),  # an allowed setting
    (("        eta_min=lr * 0.1,", "        eta_min=1e-6,"), "param_scheduler differs"),
])
def test_the_comparison_catches_a_change_to_one_recipe(edit, expected):
    ref_name, others = FAMILIES["gpu"]
    name = "POLAR_7B_full_varlenattn_custom_dataset.py"
    with open(os.path.join(CONFIG_DIR, name), encoding="utf-8") as f:
        source = f.read()
    old, new = edit
    assert source.count(old) == 1, f"{old!r} not once in {name}"
    source = source.replace(old, new)
    problems = drift(_parsed(ref_name), Parsed(source), name, others[name])
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
