"""Synthetic preference data that a tiny POLAR model can learn on a CPU.

The task is the one POLAR is built for, reduced to its core: a candidate is
preferred when its final answer agrees with the reference's. Answers are drawn
at random for every record, so nothing but the reference tells which candidate
is right. Phrasings vary between reference, chosen and rejected (either answer
may copy the reference's wording, equally often),
so surface similarity is no shortcut. Half the topics are in Chinese.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterator

from polar_xtuner.outputs import atomic_file, check_writable
from polar_xtuner.records import join_contents

# topic -> (answers, questions, reference templates, candidate templates).
# English answers always follow a space, so each is one token in every template
# (a word at the start of a text tokenizes differently, as with real tokenizers).
_EN_REF = [
    "The answer is {a}.",
    "It is {a}.",
    "After checking the description carefully, the answer is {a}.",
    "Only one option fits: {a}.",
    "Based on the text, I would say {a}.",
]
_EN_CAND = [
    "Answer: {a}.",
    "The answer is {a}.",
    "I think it is {a}.",
    "It should be {a}.",
    "Definitely {a}.",
    "My answer: {a}.",
    "Let me think. The answer is {a}.",
]
_ZH_REF = ["答案是{a}。", "是{a}。", "仔细看描述，答案是{a}。", "{a}，只有这个选项符合。"]
_ZH_CAND = ["{a}。", "答案是{a}。", "我认为是{a}。", "应该是{a}。", "肯定是{a}。", "我的答案：{a}。"]

TOPICS = {
    "color_en": (
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
        ["What color is the car in the story?", "Which color did Tom paint the door?",
         "What is the color of the new logo?", "Name the color of Anna's umbrella."],
        _EN_REF, _EN_CAND,
    ),
    "animal_en": (
        ["cat", "dog", "horse", "tiger", "rabbit", "eagle", "whale", "snake", "sheep", "monkey"],
        ["Which animal did the children see first?", "What animal lives in the old barn?",
         "Which pet does Maria own?", "What animal is on the flag of the club?"],
        _EN_REF, _EN_CAND,
    ),
    "city_en": (
        ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Seoul", "Berlin", "Madrid"],
        ["Which city did the team visit last summer?", "Where was the letter sent from?",
         "In which city was the meeting held?", "What is the home city of the author?"],
        _EN_REF, _EN_CAND,
    ),
    "color_zh": (
        ["红色", "蓝色", "绿色", "黄色", "紫色", "黑色", "白色", "灰色"],
        ["那辆车是什么颜色？", "小明把门刷成了什么颜色？", "新标志是什么颜色的？"],
        _ZH_REF, _ZH_CAND,
    ),
    "city_zh": (
        ["北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "西安"],
        ["代表团去年去了哪个城市？", "这封信是从哪里寄出的？", "会议在哪个城市举行？"],
        _ZH_REF, _ZH_CAND,
    ),
    "animal_zh": (
        ["猫", "狗", "马", "老虎", "兔子", "熊猫", "大象", "狮子"],
        ["孩子们最先看到了什么动物？", "旧谷仓里住着什么动物？", "小红养的宠物是什么？"],
        _ZH_REF, _ZH_CAND,
    ),
}

_SYSTEMS = ["You are a helpful assistant.", "你是一个乐于助人的助手。"]


def make_record(rng: random.Random, idx: int) -> dict:
    """One prompt/reference/chosen/rejected record with a random answer."""
    topic = rng.choice(sorted(TOPICS))
    answers, questions, ref_tpls, cand_tpls = TOPICS[topic]
    right, wrong = rng.sample(answers, 2)
    question = rng.choice(questions)
    ref_tpl = rng.choice(ref_tpls)
    # A quarter of the time the right answer copies the reference's wording,
    # a quarter of the time the wrong one does, so wording carries no signal.
    chosen_tpl, rejected_tpl = rng.sample(cand_tpls, 2)
    u = rng.random()
    if u < 0.25:
        chosen_tpl = ref_tpl
    elif u < 0.5:
        rejected_tpl = ref_tpl
    prompt = [{"role": "user", "content": question}]
    if rng.random() < 0.2:  # some multi-message prompts
        prompt.insert(0, {"role": "system", "content": rng.choice(_SYSTEMS)})
    return {
        "prompt": prompt,
        "reference": [{"role": "assistant", "content": ref_tpl.format(a=right)}],
        "chosen": [{"role": "assistant", "content": chosen_tpl.format(a=right)}],
        "rejected": [{"role": "assistant", "content": rejected_tpl.format(a=wrong)}],
        "category": topic,
        "source": "demo",
        "id": f"demo-{idx}",
    }


def generate(n: int, seed: int) -> Iterator[dict]:
    """Yield n records, reproducibly for a given seed."""
    rng = random.Random(seed)
    for i in range(n):
        yield make_record(rng, i)


def with_margins(records, strong: float = 2.0, weak: float = 0.5) -> Iterator[dict]:
    """The records with a ``margin``, as if annotators had graded them: ``strong``
    on the English topics, ``weak`` on the Chinese ones."""
    for rec in records:
        yield {**rec, "margin": weak if rec.get("category", "").endswith("_zh") else strong}


# Toy "policies" for policy-discrimination data: each answers with random
# answers in its own style (templates), so only the style tells them apart.
POLICY_STYLES = {
    "hedger": (["I think it is {a}.", "It should be {a}.", "Let me think. The answer is {a}."],
               ["我认为是{a}。", "应该是{a}。"]),
    "asserter": (["Definitely {a}.", "Answer: {a}.", "My answer: {a}."],
                 ["肯定是{a}。", "我的答案：{a}。"]),
    "explainer": (["The answer is {a}.", "After checking the description carefully, the answer is {a}.",
                   "Based on the text, I would say {a}."],
                  ["答案是{a}。", "仔细看描述，答案是{a}。"]),
}


def make_policy_record(rng: random.Random, idx: int, samples_per_policy: int = 2) -> dict:
    """One ``--from policies`` record: a prompt and samples of every toy policy."""
    topic = rng.choice(sorted(TOPICS))
    answers, questions, _, _ = TOPICS[topic]
    samples = []
    for policy, (en, zh) in POLICY_STYLES.items():
        for _ in range(samples_per_policy):
            tpl = rng.choice(zh if topic.endswith("_zh") else en)
            samples.append({"policy": policy, "response": tpl.format(a=rng.choice(answers))})
    rng.shuffle(samples)
    return {"prompt": rng.choice(questions), "samples": samples, "category": topic, "id": f"policies-{idx}"}


def generate_policy_samples(n: int, seed: int, samples_per_policy: int = 2) -> Iterator[dict]:
    """Yield n ``--from policies`` records, reproducibly for a given seed."""
    rng = random.Random(seed)
    for i in range(n):
        yield make_policy_record(rng, i, samples_per_policy)


def write_jsonl(path: str, records) -> int:
    """Write records as UTF-8 JSON lines; return how many were written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_demo_data(out_dir: str, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> dict:
    """Write train.jsonl and val.jsonl (different seeds, so val is held out).

    Both destinations are checked before any record is made, and each file
    replaces its earlier version only once written whole.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "val")}
    for path in paths.values():
        check_writable(path, "OUT_DIR")
    with atomic_file(paths["train"]) as train, atomic_file(paths["val"]) as val:
        return {"train": write_jsonl(train, generate(n_train, seed)), "val": write_jsonl(val, generate(n_val, seed + 1))}


def corpus_for_tokenizer(n: int = 3000, seed: int = 1234) -> list[str]:
    """Texts the tiny tokenizer learns its merges from (the demo's language)."""
    texts = []
    for rec in generate(n, seed):
        for field in ("prompt", "reference", "chosen", "rejected"):
            texts.append(join_contents(rec[field]))
    return texts
