"""The implementation behind :mod:`polar_xtuner.rft` (read that module's docstring).

It lives here, not in rft.py, because frameworks load rft.py by file path
(OpenRLHF's ``--reward.remote_url``, verl's ``custom_reward_function.path``) as
a module outside the package, where dataclasses and relative imports fail and
every load would make a second copy of the state (gathered calls, counters).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any, Sequence

# Absolute imports: OpenRLHF (and verl given a file path) load this file on its
# own, outside the package, where relative imports fail.
from polar_xtuner.constants import STATS_FILE
from polar_xtuner.encoding import EncodingSettings, PolarEncoder
from polar_xtuner.errors import UserError
from polar_xtuner.hf_layout import TRUST_ENV, remote_code_allowed, training_run_problem
from polar_xtuner.records import read_settings
from polar_xtuner.scoring.fleet import ROUTINGS, group_key
from polar_xtuner.scoring.client import (
    SERVER_TYPES,
    RemoteScoringError,
    RemoteSettings,
    parse_addresses,
)

log = logging.getLogger(__name__)

# End-of-turn markers that OpenRLHF leaves on the decoded query (it decodes
# with special tokens); stripped from the end of a response.
END_MARKERS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<eos>",
               "<|end|>", "<｜end▁of▁sentence｜>")


class RFTConfigError(UserError):
    """A setting (environment variable or config file) is missing or wrong."""


@dataclass(frozen=True)
class RFTSettings(RemoteSettings):
    """How the reward functions reach POLAR: the remote settings of evaluation, and RL's own.

    The server fields and their defaults are :class:`RemoteSettings`' (one
    rule for evaluation and RL); the module docstring lists every variable.
    """

    model: str = ""
    strip_thinking: bool = True
    normalize: bool = False
    fallback_score: float | None = None

    @classmethod
    def from_env(cls, environ=None, overrides: dict | None = None) -> "RFTSettings":
        """Read ``POLAR_CONFIG`` (a JSON file), then the ``POLAR_*`` variables over it.

        Args:
            environ: The environment (default: os.environ).
            overrides: ``polar_*`` keyword arguments from the framework's
                config (verl's ``reward_kwargs``), applied last.

        Raises:
            RFTConfigError: A value does not parse, naming the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = env.get("POLAR_CONFIG")
        if path:
            try:
                loaded = read_settings(path)
            except ValueError as e:
                raise RFTConfigError(f"POLAR_CONFIG={path}: cannot read it ({e})") from None
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(loaded) - known)
            if unknown:
                raise RFTConfigError(f"POLAR_CONFIG={path}: unknown key(s) {', '.join(unknown)}")
            values.update({k: (k, v) for k, v in loaded.items()})
        for f in fields(cls):
            name = "POLAR_" + f.name.upper()
            if env.get(name, "") != "":
                values[f.name] = (name, env[name])
        known = {f.name for f in fields(cls)}
        for name, raw in (overrides or {}).items():
            key = name[len("polar_"):] if name.startswith("polar_") else name
            if key not in known:
                raise RFTConfigError(f"unknown reward kwarg {name!r} (known: "
                                     f"{', '.join('polar_' + k for k in sorted(known))})")
            values[key] = (name, raw)
        kw = {}
        for key, (where, raw) in values.items():
            kw[key] = _parse_setting(key, raw, where)
        settings = cls(**kw)
        if settings.server_type not in SERVER_TYPES:
            raise RFTConfigError(f"POLAR_SERVER_TYPE must be one of {', '.join(SERVER_TYPES)}, "
                                 f"got {settings.server_type!r}")
        if settings.routing not in ROUTINGS:
            raise RFTConfigError(f"POLAR_ROUTING must be one of {', '.join(ROUTINGS)}, got {settings.routing!r}")
        return settings


def _parse_setting(key: str, raw: Any, where: str):
    try:
        if key in ("strip_thinking", "normalize"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected 1/0, true/false")
        if key == "fallback_score":
            if raw is None or str(raw).strip().lower() in ("", "none"):
                return None
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("must be finite")
            return value
        if key in ("timeout",):
            value = float(raw)
            if not (math.isfinite(value) and value > 0):  # inf would wait for ever
                raise ValueError("must be a finite number > 0")
            return value
        if key in ("max_retries", "batch_size", "batch_tokens", "concurrency"):
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan  # "abc", "1.5x": refused below, with the rule
            if isinstance(raw, bool) or not value.is_integer() or value < 1:
                raise ValueError("must be a whole number >= 1")
            return int(value)
        if isinstance(raw, list):
            raw = ",".join(map(str, raw))
        return str(raw)
    except (TypeError, ValueError) as e:
        raise RFTConfigError(f"{where}={raw!r}: {e}") from None


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


def strip_thinking(response: str) -> str:
    """The answer part of a response: ``<think>...</think>`` removed.

    A closing tag without an opening one (the opening tag was in the chat
    template) drops everything before it; an opening tag that never closes
    means the response is all thinking, and the answer is empty.
    """
    text = _THINK_BLOCK.sub("", response)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def _plain(value):
    """Parquet hands lists over as numpy arrays: make them Python lists again."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _field(value, what: str):
    """A prompt or reference: a message list or a string, checked."""
    value = _plain(value)
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:  # a single message
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        return value
    raise ValueError(f"{what} must be a string or a list of {{role, content}} messages, got {str(value)[:120]}")


def reward_stats(model_dir: str) -> tuple[float, float]:
    """(mean, std) of the model's scores saved by ``tools/eval_pref.py --write-stats``.

    Raises:
        RFTConfigError: No statistics in the model dir, or they are unusable.
    """
    path = os.path.join(model_dir, STATS_FILE)
    if not os.path.isfile(path):
        raise RFTConfigError(f"POLAR_NORMALIZE=1 needs {path}: run tools/eval_pref.py --model {model_dir} "
                             f"--data HELD_OUT.jsonl --write-stats")
    try:
        stats = read_settings(path)
        mean, std = float(stats["mean"]), float(stats["std"])
    except (ValueError, KeyError, TypeError) as e:
        raise RFTConfigError(f"{path}: unreadable statistics ({e})") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise RFTConfigError(f"{path}: mean {mean} / std {std} cannot normalise")
    return mean, std


class PolarReward:
    """Scores (prompt, reference, response) triples on served POLAR models.

    Thread-safe. Concurrent :meth:`submit` calls (verl's reward loop awaits a
    whole batch at once; OpenRLHF calls from many threads) are gathered for a
    few milliseconds into one scoring round, sent in requests of at most
    ``batch_size`` texts and ``batch_tokens`` tokens, ``concurrency`` of them
    in flight per server. A batch that fails does so within
    ``scorer.batch_deadline_s`` (``timeout`` per attempt, wall clock, plus
    the backoff between attempts), whatever the server does.

    Args:
        settings: Where the servers are and how to score.
        tokenizer: The POLAR tokenizer; loaded from ``settings.model`` when None.
        address: Overrides ``settings.server_address`` (verl's router).
        gather_ms: How long a round waits for more calls to join it.
    """

    def __init__(self, settings: RFTSettings, tokenizer=None, address: str | None = None,
                 gather_ms: float = 20.0):
        self.settings = settings
        address = address or settings.server_address
        if not address:
            raise RFTConfigError("POLAR_SERVER_ADDRESS is not set (HOST:PORT of the POLAR server, "
                                 "or several comma-separated)")
        try:
            parse_addresses(address)
        except ValueError as e:
            raise RFTConfigError(f"POLAR_SERVER_ADDRESS: {e}") from None
        model_dir = settings.model or (getattr(tokenizer, "name_or_path", "") if tokenizer is not None else "")
        if tokenizer is None:
            if not settings.model:
                raise RFTConfigError("POLAR_MODEL is not set (the converted model dir: tokenizer and lengths)")

            problem = training_run_problem(settings.model, f"POLAR_MODEL={settings.model}")
            if problem:  # transformers would answer with 500 characters about the hub
                raise RFTConfigError(problem)
            if not os.path.isdir(settings.model):
                raise RFTConfigError(f"POLAR_MODEL={settings.model}: no such directory")
            from transformers import AutoTokenizer

            try:  # the tokenizer's code runs when it loads: ours, or the user's consent
                trust = remote_code_allowed(settings.model, os.environ.get(TRUST_ENV) == "1", f"{TRUST_ENV}=1")
            except UserError as e:
                raise RFTConfigError(f"POLAR_MODEL={e}") from None
            tokenizer = AutoTokenizer.from_pretrained(settings.model, trust_remote_code=trust)
        try:
            self.encoding = EncodingSettings.from_model_dir(model_dir if os.path.isdir(model_dir) else None)
        except ValueError as e:
            raise RFTConfigError(str(e)) from None
        self.encoder = PolarEncoder(tokenizer, self.encoding.max_length, self.encoding.max_response_length)
        self.stats = reward_stats(model_dir) if settings.normalize else None
        self.scorer = settings.scorer(address, model_name=model_dir or "POLAR")
        self.fallback_uses = 0
        self.gather_s = gather_ms / 1000
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, str, Future]] = []  # (text, group key, its future)
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None

    # -- building texts -------------------------------------------------
    def inputs(self, prompts: Sequence, references: Sequence, responses: Sequence[str]) -> list:
        """What the server is sent for triples (thinking stripped when configured): ids for vLLM, else texts."""
        if self.settings.strip_thinking:
            responses = [strip_thinking(r) for r in responses]
        items = [(p, r, (c,)) for p, r, c in zip(prompts, references, responses)]
        return self.encoder.serving_inputs(items, self.scorer.server_type)

    def _finish(self, raw: list[float]) -> list[float]:
        if self.stats is None:
            return raw
        mean, std = self.stats
        return [(s - mean) / std for s in raw]

    def _fallback(self, n: int, error: Exception) -> list[float]:
        if self.settings.fallback_score is None:
            raise error
        with self._lock:
            self.fallback_uses += n
            uses = self.fallback_uses
        log.error("POLAR reward failed for %d response(s); using the fallback score %s (%d use(s) so far): %s",
                  n, self.settings.fallback_score, uses, error)
        return [self.settings.fallback_score] * n

    # -- scoring ----------------------------------------------------------
    def score(self, prompts: Sequence, references: Sequence, responses: Sequence[str]) -> list[float]:
        """Scores of many triples in one round (the batch entry points)."""
        texts = self.inputs(prompts, references, responses)
        keys = [group_key(p, r) for p, r in zip(prompts, references)]
        try:
            return self._finish(self.scorer.score(texts, keys))
        except RemoteScoringError as e:
            return self._fallback(len(texts), e)

    def submit(self, prompt, reference, response: str) -> Future:
        """Queue one triple; the future resolves to its score (or the error)."""
        text = self.inputs([prompt], [reference], [response])[0]
        fut: Future = Future()
        with self._wake:
            self._pending.append((text, group_key(prompt, reference), fut))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="polar-reward", daemon=True)
                self._worker.start()
            self._wake.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._pending:
                    # re-checked after a timeout: a submit may have slipped in while it expired
                    if not self._wake.wait(timeout=30) and not self._pending:
                        self._worker = None  # idle: a later submit starts a new one
                        return
                    if not self._pending:
                        continue
            # Let the rest of a gathered batch arrive: wait while calls keep
            # coming (verl submits a whole batch in a burst), at most a second.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                with self._wake:
                    before = len(self._pending)
                time.sleep(self.gather_s)
                with self._wake:
                    if len(self._pending) == before:
                        break
            with self._wake:
                taken, self._pending = self._pending, []
            # a caller that gave up (a cancelled await) is dropped from the round
            batch = [(t, k, f) for t, k, f in taken if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            texts = [t for t, _, _ in batch]
            try:
                try:
                    scores = self._finish(self.scorer.score(texts, [k for _, k, _ in batch]))
                except RemoteScoringError as e:
                    scores = self._fallback(len(texts), e)
            except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
                for _, _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, _, fut), s in zip(batch, scores):
                fut.set_result(s)


_instances: dict[tuple, PolarReward] = {}
_instances_lock = threading.Lock()


def _polar_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k.startswith("polar_")}


def get_reward(address: str | None = None, tokenizer=None, overrides: dict | None = None) -> PolarReward:
    """The process's PolarReward for the current settings (built once, then reused)."""
    settings = RFTSettings.from_env(overrides=overrides)
    key = (settings, address, id(tokenizer) if tokenizer is not None and not settings.model else None)
    with _instances_lock:
        if key not in _instances:
            _instances[key] = PolarReward(settings, tokenizer=None if settings.model else tokenizer,
                                          address=address)
        return _instances[key]


def loaded_rewards() -> list[PolarReward]:
    """The rewards this process has built, one per settings (their counters, e.g. ``fallback_uses``)."""
    with _instances_lock:
        return list(_instances.values())


def forget_rewards() -> None:
    """Drop the built rewards, so that the next call reads the settings again."""
    with _instances_lock:
        _instances.clear()


def _prompt_of(extra_info, kwargs) -> Any:
    extra_info = _plain(extra_info) if extra_info is not None else {}
    if isinstance(extra_info, dict) and extra_info.get("prompt") is not None:
        return _field(extra_info["prompt"], "extra_info['prompt']")
    for key in ("prompt", "prompt_str"):
        if kwargs.get(key) is not None:
            return _field(kwargs[key], key)
    raise ValueError("no prompt: POLAR scores a response against the prompt and the reference, and verl "
                     "passes the prompt only in extra_info['prompt'] (tools/make_rft_data.py writes it)")


def _reference_of(ground_truth) -> Any:
    if ground_truth is None:
        raise ValueError("no reference: reward_model.ground_truth is empty (tools/make_rft_data.py writes it)")
    return _field(ground_truth, "ground_truth")


# -- verl -------------------------------------------------------------------
async def compute_score(data_source, solution_str, ground_truth, extra_info=None, reward_router_address=None,
                        reward_model_tokenizer=None, **kwargs) -> float:
    """verl's per-sample reward (reward loop): POLAR's score of ``solution_str``.

    verl awaits this for every sample of a batch at once; the calls are
    gathered into a few requests. With ``reward_router_address`` (verl serving
    the reward model itself) the score goes through that router.
    """
    prompt, reference = _prompt_of(extra_info, kwargs), _reference_of(ground_truth)
    reward = get_reward(reward_router_address, reward_model_tokenizer, _polar_kwargs(kwargs))
    fut = reward.submit(prompt, reference, solution_str)
    return await asyncio.wrap_future(fut)


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **kwargs) -> list[float]:
    """verl's batch reward manager: POLAR's scores of a whole batch, in order."""
    n = len(solution_strs)
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * n
    if not (len(ground_truths) == len(extra_infos) == n):
        raise ValueError(f"compute_score_batch: {n} responses, {len(ground_truths)} ground truths, "
                         f"{len(extra_infos)} extra_infos")
    prompts = [_prompt_of(e, {}) for e in extra_infos]
    refs = [_reference_of(g) for g in ground_truths]
    reward = get_reward(kwargs.get("reward_router_address"), kwargs.get("reward_model_tokenizer"),
                        _polar_kwargs(kwargs))
    return reward.score(prompts, refs, list(solution_strs))


# -- OpenRLHF ---------------------------------------------------------------
def parse_label(label) -> tuple[Any, Any]:
    """(prompt, reference) from an OpenRLHF label.

    The label is a JSON object (or its string): ``{"prompt": messages or str,
    "reference": messages or str}``, the raw prompt and the reference answer
    (``tools/make_rft_data.py --format openrlhf`` writes it).
    """
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except ValueError:
            raise ValueError('label must be a JSON object {"prompt": ..., "reference": ...}, got a plain string '
                             f"{label[:80]!r}") from None
    label = _plain(label)
    if not isinstance(label, dict) or "reference" not in label or "prompt" not in label:
        raise ValueError(f'label must be a JSON object with "prompt" and "reference", got {str(label)[:120]}')
    return _field(label["prompt"], "label['prompt']"), _field(label["reference"], "label['reference']")


def response_of(query: str, prompt: str) -> str:
    """The response part of an OpenRLHF query (templated prompt + response, special tokens kept)."""
    if query.startswith(prompt):
        response = query[len(prompt):]
    else:
        # The decoded prompt tokens may differ from the prompt string at its
        # start (left truncation, BOS): find the prompt's tail instead.
        tail = prompt[-200:]
        at = query.rfind(tail) if tail else -1
        if at < 0:
            raise ValueError("cannot find the prompt inside the query, so the response cannot be cut out")
        response = query[at + len(tail):]
    changed = True
    while changed:
        changed = False
        response = response.rstrip()
        for marker in END_MARKERS:
            if response.endswith(marker):
                response, changed = response[: -len(marker)], True
    return response


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF's ``--reward.remote_url rft.py`` entry point.

    Returns:
        ``{"rewards", "scores", "extra_logs"}``: POLAR's scores as a float
        tensor (one per query), and the running count of fallback uses.
    """
    import torch

    triples = [(*parse_label(lab), response_of(q, p)) for q, p, lab in zip(queries, prompts, labels)]
    reward = get_reward()
    futures = [reward.submit(p, r, c) for p, r, c in triples]
    scores = torch.tensor([f.result() for f in futures], dtype=torch.float32)
    return {"rewards": scores, "scores": scores,
            "extra_logs": {"polar_fallback_uses": torch.tensor([float(reward.fallback_uses)] * len(triples))}}
