"""Scores from a served POLAR model (sglang, vllm or lmdeploy).

Transport only: what is sent comes from
:meth:`polar_xtuner.encoding.PolarEncoder.serving_inputs` (token ids for vLLM,
texts for the others), the same encoding as training. Each backend's request and response shape follows
POLAR's published client:

=========  ==================================================  ================================
server     request                                             score in the response
=========  ==================================================  ================================
sglang     POST /classify {"model", "text"}                    ``response[i]["embedding"][0]``
vllm       POST /pooling {"input", "use_activation": false}    ``data[i]["data"][-1][0]``
lmdeploy   POST /pooling {"input"}                             ``data[i]["data"]``
=========  ==================================================  ================================

vLLM (0.10 and later) applies a sigmoid to a reward model's pooled scores
unless told otherwise, which squeezes POLAR's scores into (0, 1) and turns
large margins into ties. Every vLLM request therefore asks for raw scores
(``"use_activation": false``), and the first answer of each server is checked:
scores outside [0, 1] are raw; scores all inside are asked again with the
activation on, and a server that ignores the request field is refused rather
than trusted. Answers are matched to texts by their ``index`` where the server
gives one.

Unlike POLAR's client, a failed request never turns into ``None``: each
request is bounded by a wall-clock deadline (connecting, sending, the first
byte and the whole body, however slowly the server trickles it), retried a
bounded number of times with backoff (on the next server when there are
several), and then raises :class:`RemoteScoringError` with the last status and
a snippet of the body. Several requests are kept in flight on every replica.

Several replicas (a fleet, ``tools/serve.sh --replicas N``) are reached
through the addresses given: an address that answers ``GET /workers`` as
vllm-router does stands for the healthy workers it lists (read again every
few seconds, and after a failure), any other address is a server itself.
Texts are placed by :mod:`polar_xtuner.scoring.fleet`: those of one prompt
and reference on one replica, where its prefix cache has their shared
prefix, with bounded load; a request that fails moves to the key's next
replica, and the one it failed on is left out for a while.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from polar_xtuner.constants import REWARD_SEP
from polar_xtuner.errors import EXIT_USER, EXIT_VERIFY, PolarError
from polar_xtuner.scoring.fleet import ROUTINGS, ReplicaSet, group_key

SERVER_TYPES = ("sglang", "vllm", "lmdeploy")
# Request sizes. On vLLM's CPU build (2026-11-29, bench/README.md), requests of
# 32 short texts ran at 0.75x the speed of 64-1000 (each request's fixed
# cost), while 780-token texts ran best at 8-16 a request (6-12k tokens) and
# at 0.8x in requests of 50k tokens and more.
DEFAULT_BATCH_TEXTS = 256
DEFAULT_BATCH_TOKENS = 16384
# One default for evaluation and RL alike. A request carries at most
# DEFAULT_BATCH_TOKENS tokens, which a served 7B scores in well under a second
# on a GPU and a few seconds on CPU: a minute without the whole answer is a
# stalled server, and an RL step waits on it (timeout x attempts + backoff).
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_CONCURRENCY = 4  # requests in flight per server
# Seconds between reads of a router's worker list (a replica that died or came back).
MEMBERSHIP_S = 5.0
# Seconds an address may take to say whether it is a router (once per scorer).
LOOKUP_TIMEOUT_S = 2.0
# Texts of a server's first batch asked again with the activation on (the
# sigmoid check); a round is not cut finer than this, so the check has them.
PROBE_TEXTS = 4


class RemoteScoringError(PolarError, RuntimeError):
    """The server could not be reached, or answered something that is not a score. Exit 3."""

    exit_code = EXIT_VERIFY


class TextTooLongError(RemoteScoringError):
    """The server refused a text longer than its context limit: a length setting to fix. Exit 2.

    Still a :class:`RemoteScoringError`, so the RL functions' fallback score
    covers it like any other failed request.
    """

    exit_code = EXIT_USER


# How servers word a refused over-long input (vLLM 0.8-0.32: "This model's maximum context length is 512
# tokens. However, your prompt contains 600 input tokens, ..."; sglang: "... exceeds the maximum allowed
# length (512 tokens)"), and where the limit is said.
_TOO_LONG = re.compile(r"maximum context length|max_model_len|context length|maximum allowed length|"
                       r"too long|exceeds? the max", re.I)
_LIMIT = re.compile(r"maximum context length is (\d+)|max_model_len\W{0,3}(\d+)|maximum allowed length\D{0,3}(\d+)",
                    re.I)


def _snippet(text: str, n: int = 200) -> str:
    """The start of a server's answer for an error message, on one line."""
    return " ".join(text[:n].split())


def too_long_error(endpoint: str, status: int, text: str) -> TextTooLongError | None:
    """The error for a server's refusal of an over-long text (None when the refusal is something else)."""
    if status not in (400, 413, 422) or not _TOO_LONG.search(text):
        return None
    m = _LIMIT.search(text)
    limit = next((g for g in m.groups() if g), None) if m else None
    said = f" of {limit} tokens" if limit else ""
    return TextTooLongError(
        f"{endpoint} refused a text longer than its limit{said} (HTTP {status}: {_snippet(text, 300)}); score with "
        f"--max-length {limit or 'N'} (or less) so texts are cut to fit, or serve with a longer limit "
        f"(vLLM --max-model-len); the RL functions take the lengths of the model's polar_encoding.json")


def http_request(method: str, url: str, body: bytes | None = None, timeout: float = 60.0,
                 headers: dict | None = None) -> tuple[int, bytes]:
    """One HTTP request, answered whole within ``timeout`` seconds of wall-clock time, or an error.

    The deadline covers everything: resolving and connecting, sending, the
    first byte and the whole body. A socket timeout alone bounds each read,
    so a server that sends a byte every half second would hold a request for
    ever; and ``http.client`` forgets its socket (``conn.sock = None``) as
    soon as a response will close the connection (HTTP/1.0, ``Connection:
    close``), so a watchdog that shuts ``conn.sock`` finds nothing to shut.
    Here the request runs in a worker thread that hands over its own
    reference to the socket, and the caller waits at most ``timeout``: at the
    deadline it shuts the socket (the worker's blocked read returns) and
    raises, whatever the worker is doing, even resolving a name.

    Raises:
        TimeoutError: No complete answer by the deadline.
        OSError: The connection failed, or the answer was cut short or malformed.
    """
    import http.client
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    state: dict = {}
    lock = threading.Lock()
    done = threading.Event()

    def work():
        conn = cls(u.hostname, u.port, timeout=timeout)
        res = None
        try:
            conn.connect()
            with lock:
                if state.get("expired"):
                    return
                state["sock"] = conn.sock  # ours: http.client drops conn.sock when a response closes the connection
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            state["result"] = (res.status, res.read())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            state["error"] = e
        finally:
            if res is not None:
                res.close()
            conn.close()
            done.set()

    threading.Thread(target=work, name="polar-http", daemon=True).start()
    if not done.wait(timeout):
        with lock:
            state["expired"] = True
            sock = state.get("sock")
        if sock is not None:
            try:  # the plain socket's shutdown, also under TLS: it wakes the worker's read
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    if "result" in state:
        return state["result"]
    e = state["error"]
    if isinstance(e, http.client.HTTPException):  # IncompleteRead (a body cut short), BadStatusLine, ...
        raise OSError(f"{type(e).__name__}: {e}") from None
    raise e  # an OSError; anything else is a bug and keeps its traceback


def post_json(url: str, payload: dict, timeout: float) -> tuple[int, bytes]:
    """POST JSON and return (status, body), all within ``timeout`` seconds (see :func:`http_request`).

    Raises:
        TimeoutError: The deadline passed.
        OSError: The connection failed or the answer was cut short.
    """
    return http_request("POST", url, json.dumps(payload).encode(), timeout, {"Content-Type": "application/json"})


class BadScoreError(RemoteScoringError):
    """A score that is not a finite number; ``index`` is the text's position in the request list."""

    def __init__(self, server_type: str, value, index: int):
        kind = "non-finite" if isinstance(value, float) else "non-numeric"
        super().__init__(f"{server_type} answered a {kind} score ({value!r}) for text {index}")
        self.server_type, self.value, self.index, self.kind = server_type, value, index, kind


def _as_score(value, server_type: str, index: int) -> float:
    # A bool is an int in Python, and "1.5" converts with float(): neither is a score.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadScoreError(server_type, value, index)
    value = float(value)
    if not math.isfinite(value):
        raise BadScoreError(server_type, value, index)
    return value


def _last_token_score(data):
    """vLLM's per-token scores: a list of [score] lists, or (base64) little-endian float32 bytes."""
    if isinstance(data, str):
        import base64
        import struct

        raw = base64.b64decode(data)
        if len(raw) < 4 or len(raw) % 4:
            raise ValueError(f"{len(raw)} bytes is not a float32 array")
        return struct.unpack("<f", raw[-4:])[0]
    return data[-1][0]


def _in_request_order(server_type: str, entries: list, n: int) -> list:
    """A response's entries in the order of the request's texts, by their ``index`` where given.

    vLLM and lmdeploy number each answer (``data[i]["index"]``); nothing
    promises that the list comes in the request's order. Entries without
    any index are taken in order.

    Raises:
        RemoteScoringError: Some entries have an index and some do not, or the
            indices are not each of 0..n-1 once.
    """
    indices = [e.get("index") if isinstance(e, dict) else None for e in entries]
    if all(i is None for i in indices):
        return entries
    if all(isinstance(i, int) and not isinstance(i, bool) for i in indices) and sorted(indices) == list(range(n)):
        ordered = [None] * n
        for i, e in zip(indices, entries):
            ordered[i] = e
        return ordered
    shown = ", ".join(map(repr, indices[:20])) + (", ..." if len(indices) > 20 else "")
    raise RemoteScoringError(f"{server_type} answered with indices [{shown}] for {n} texts, not each of "
                             f"0..{n - 1} once; its scores cannot be matched to the texts")


def parse_scores(server_type: str, body, n: int) -> list[float]:
    """Read n scores from a server's JSON body, in the request's order.

    Raises:
        RemoteScoringError: The body does not have the backend's shape, its
            indices do not match the request, or a score is not a finite number.
    """
    if server_type not in SERVER_TYPES:
        raise RemoteScoringError(f"unknown server type {server_type!r}")
    try:
        entries = body if server_type == "sglang" else body["data"]
        if not isinstance(entries, list):
            raise TypeError(f"expected a list of answers, got {type(entries).__name__}")
        if len(entries) == n:
            entries = _in_request_order(server_type, entries, n)
        if server_type == "sglang":
            raw = [e["embedding"][0] for e in entries]
        elif server_type == "vllm":
            raw = [_last_token_score(e["data"]) for e in entries]
        else:
            raw = [e["data"] for e in entries]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise RemoteScoringError(
            f"{server_type} answered in an unexpected shape ({type(e).__name__}: {e}): {_snippet(str(body))}"
        ) from None
    if len(raw) != n:
        raise RemoteScoringError(f"{server_type} returned {len(raw)} scores for {n} texts")
    return [_as_score(v, server_type, i) for i, v in enumerate(raw)]


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """Base URLs from "host:port[,host:port...]" (or full http:// URLs).

    Raises:
        ValueError: No address, or one without a port.
    """
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    urls = []
    for item in (a.strip() for a in items):
        if not item:
            continue
        base = item if item.startswith(("http://", "https://")) else f"http://{item}"
        hostport = base.split("://", 1)[1].split("/", 1)[0]
        if ":" not in hostport:
            raise ValueError(f"server address {item!r} has no port (expected HOST:PORT)")
        urls.append(base.rstrip("/"))
    if not urls:
        raise ValueError("no server address given (expected HOST:PORT[,HOST:PORT...])")
    return urls


def _interleave(lanes: list[list]) -> list[list]:
    """Rows of the lanes' i-th items: [[a0, b0], [a1, b1], [a2], ...]."""
    depth = max((len(lane) for lane in lanes), default=0)
    return [[lane[i] for lane in lanes if i < len(lane)] for i in range(depth)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# bf16 keeps 8 significant bits (a relative step of 4e-3), and one text's score
# moves with the batch it is computed in: relations between two answers hold
# within this relative tolerance, not to the last bit.
SIGMOID_RTOL = 1e-2


def _is_sigmoid_of(p: float, r: float, rtol: float = SIGMOID_RTOL) -> bool:
    """Whether p is sigmoid(r), compared as logits (a sigmoid near 0 or 1 hides r's digits)."""
    if 0.0 < p < 1.0:
        return abs(math.log(p) - math.log1p(-p) - r) <= rtol * max(1.0, abs(r))
    return abs(p - _sigmoid(r)) <= rtol  # saturated at 0 or 1 in the server's precision


@dataclass(frozen=True)
class RemoteSettings:
    """How to reach served POLAR models: the one settings object of evaluation and RL.

    ``tools/eval_pref.py`` fills it from its flags; the RL reward functions'
    :class:`polar_xtuner.rl.reward.RFTSettings` extends it (from ``POLAR_*``
    variables), so both score with the same defaults.

    Attributes:
        server_type: "sglang", "vllm" or "lmdeploy".
        server_address: "host:port", several comma-separated (load is spread).
        timeout: Seconds a request may take in all (:data:`DEFAULT_TIMEOUT_S`
            says why a minute).
        max_retries: Attempts per batch before giving up.
        batch_size: The most texts per request.
        batch_tokens: The most tokens per request.
        concurrency: Requests in flight per server (per replica of a fleet).
        routing: "prefix" (texts of one prompt and reference on one replica
            of a fleet) or "round_robin" (texts dealt to the replicas in
            turn, the baseline ``make bench`` compares against).
    """

    server_type: str = "vllm"
    server_address: str = ""
    timeout: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    batch_size: int = DEFAULT_BATCH_TEXTS
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    concurrency: int = DEFAULT_CONCURRENCY
    routing: str = "prefix"

    def scorer(self, address: str | Sequence[str] | None = None, model_name: str = "POLAR") -> "RemoteScorer":
        """A :class:`RemoteScorer` with these settings (``address`` overrides ``server_address``)."""
        return RemoteScorer(self.server_type, address or self.server_address, model_name, timeout=self.timeout,
                            max_retries=self.max_retries, batch_size=self.batch_size,
                            batch_tokens=self.batch_tokens, concurrency=self.concurrency, routing=self.routing)


@dataclass
class RemoteScorer:
    """Scores texts on one or several POLAR servers.

    Args:
        server_type: "sglang", "vllm" or "lmdeploy".
        address: "host:port", several comma-separated, or a list of them
            (full http:// URLs work too). Batches are spread over all.
        model_name: The served model's name (sglang's "model" field).
        timeout: Seconds a request may take in all, wall clock: connecting,
            sending, the first byte and the whole body.
        max_retries: Attempts per batch before giving up; a batch fails
            within :attr:`batch_deadline_s`.
        backoff: Seconds before the first retry, doubled after each.
        batch_size: The most texts per request.
        batch_tokens: The most tokens per request; a longer text goes alone.
            Token-id inputs (vLLM) count their ids; text inputs count their
            characters, which bound their tokens from above.
        concurrency: Requests in flight per server (per replica of a fleet).
        routing: "prefix" or "round_robin" (see :class:`RemoteSettings`).

    A request's work on the server grows with its tokens, and each request
    has a fixed cost too: many short texts go in one request, long ones in
    several (see :meth:`batches`).
    """

    server_type: str
    address: str | Sequence[str]
    model_name: str = "POLAR"
    timeout: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff: float = 0.5
    batch_size: int = DEFAULT_BATCH_TEXTS
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    concurrency: int = DEFAULT_CONCURRENCY
    routing: str = "prefix"
    _checked: set = field(default_factory=set, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        if self.server_type not in SERVER_TYPES:
            raise ValueError(f"server type must be one of {', '.join(SERVER_TYPES)}, got {self.server_type!r}")
        if self.max_retries < 1:
            raise ValueError("max_retries must be >= 1")
        if self.batch_size < 1 or self.batch_tokens < 1 or self.concurrency < 1:
            raise ValueError("batch_size, batch_tokens and concurrency must be >= 1")
        if not self.timeout > 0:
            raise ValueError("timeout must be > 0")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        self.urls = parse_addresses(self.address)
        self.path = "/classify" if self.server_type == "sglang" else "/pooling"
        self.endpoints = [u + self.path for u in self.urls]
        self.fleet = ReplicaSet(self.urls)
        self._routers: list[str] | None = None  # None: not looked for yet
        self._members_at = -math.inf
        self._reading = False

    def _payload(self, texts, raw: bool = True):
        if self.server_type == "sglang":
            return {"model": self.model_name, "text": texts}
        if self.server_type == "vllm":
            # Per-token scores as base64 float32 rather than JSON lists: the
            # server's JSON encoding of every token's score is most of its work.
            return {"input": texts, "use_activation": not raw, "encoding_format": "base64",
                    "embed_dtype": "float32", "endianness": "little"}
        return {"input": texts}

    @property
    def batch_deadline_s(self) -> float:
        """The longest one batch can take before it fails: ``timeout`` per attempt plus the backoff between.

        ``timeout * max_retries + backoff * (2 ** (max_retries - 1) - 1)``;
        a vLLM server's first batch may add one more ``timeout`` for the
        sigmoid probe (:meth:`_check_raw`), which is asked only when the
        scores alone cannot tell, and a round up to :data:`LOOKUP_TIMEOUT_S`
        per address to read a router's worker list (the first round, and then
        at most every :data:`MEMBERSHIP_S`; a plain server is asked once).
        """
        return self.timeout * self.max_retries + self.backoff * (2 ** (self.max_retries - 1) - 1)

    def _request(self, endpoint: str, payload: dict, n: int):
        """One POST; returns scores, or a retryable error text. Raises on a final error."""
        try:
            status, raw = post_json(endpoint, payload, self.timeout)
        except OSError as e:  # TimeoutError, connection failures, a body cut short: worth retrying
            return None, f"{type(e).__name__}: {e}"
        text = raw.decode("utf-8", "replace")
        if status >= 500 or status == 429:  # worth retrying
            return None, f"HTTP {status}: {_snippet(text)}"
        if status != 200:
            raise too_long_error(endpoint, status, text) or RemoteScoringError(
                f"{endpoint} answered HTTP {status}: {_snippet(text)}")
        if not text.strip():  # as a connection cut before the body: worth retrying
            return None, f"HTTP {status} with an empty body"
        try:
            # NaN/Infinity literals parse here and are refused as scores by parse_scores
            body = json.loads(text)
        except ValueError:
            raise RemoteScoringError(f"{endpoint} answered non-JSON: {_snippet(text)}") from None
        return parse_scores(self.server_type, body, n), None

    def _post(self, texts: list, replicas: Sequence[str]) -> tuple[list[float], str]:
        """Score one batch on the first of ``replicas``, moving down the list when one fails.

        Attempt i goes to ``replicas[i % len(replicas)]``; a replica a request
        failed on is left out of the fleet's placement for a while. Gives up
        within :attr:`batch_deadline_s` (plus the probe's timeout).

        Returns:
            The scores, and the replica that gave them.
        """
        last = "no attempt"
        start = time.monotonic()
        for attempt in range(self.max_retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            replica = replicas[attempt % len(replicas)]
            endpoint = replica + self.path
            scores, last = self._request(endpoint, self._payload(texts), len(texts))
            if scores is not None:
                self._check_raw(endpoint, texts, scores)
                return scores, replica
            last = f"{endpoint}: {last}"
            if len(self.fleet.replicas) > 1:
                self.fleet.mark_failed(replica)
                self._refresh_members(force=True)
        raise RemoteScoringError(
            f"scoring failed after {self.max_retries} attempt(s) in {time.monotonic() - start:.1f} s (--timeout "
            f"{self.timeout:g} s each, at most {self.batch_deadline_s:g} s with the backoff); last error: {last}")

    def _check_raw(self, endpoint: str, texts: list[str], raw: list[float]) -> None:
        """Once per vLLM server: make sure the scores we got are not sigmoids.

        Decided by the values, within what bf16 serving gives (scores of one
        text drift by 1e-4 and more between batches): a score outside [0, 1]
        is no sigmoid's, so the answers are raw. When all lie inside [0, 1]
        the first texts are asked again with the activation on: a server that
        honours the field answers sigmoid(raw) (within ``SIGMOID_RTOL``, as
        logits); one that ignores it answers the same numbers again, and
        scores that may be sigmoids we cannot undo are refused.
        """
        if self.server_type != "vllm":
            return
        with self._lock:
            if endpoint in self._checked:
                return
            self._checked.add(endpoint)
        if any(not 0.0 <= r <= 1.0 for r in raw):
            return
        probe_texts = texts[:PROBE_TEXTS]
        probe, err = self._request(endpoint, self._payload(probe_texts, raw=False), len(probe_texts))
        if probe is None:
            raise RemoteScoringError(f"{endpoint}: the activation check failed: {err}")
        if all(_is_sigmoid_of(p, r) for p, r in zip(probe, raw)):
            return  # the activation comes only when asked for: these are raw scores
        raise RemoteScoringError(
            f"{endpoint} does not give raw scores (its answers look like sigmoid outputs and it ignores "
            f"'use_activation': false); start vLLM with --pooler-config '{{\"use_activation\": false}}' "
            f"(tools/serve.sh does)"
        )

    def batches(self, texts: list, slots: int | None = None) -> list[tuple[int, int]]:
        """``(start, end)`` of each request's texts, in order.

        A request takes at most ``batch_size`` texts and ``batch_tokens``
        tokens (a longer text goes alone), and no more than its share of the
        texts over ``slots`` request slots (default: every address given x
        ``concurrency``), so that a small round still fills every slot; but
        not fewer than ``PROBE_TEXTS`` for that share, which the sigmoid
        check reads.
        """
        slots = slots or len(self.endpoints) * self.concurrency
        cap = min(self.batch_size, max(PROBE_TEXTS, -(-len(texts) // slots)))
        spans, start, tokens = [], 0, 0
        for i, text in enumerate(texts):
            if i > start and (i - start == cap or tokens + len(text) > self.batch_tokens):
                spans.append((start, i))
                start, tokens = i, 0
            tokens += len(text)
        if start < len(texts):
            spans.append((start, len(texts)))
        return spans

    # -- the fleet --------------------------------------------------------
    def _workers(self, url: str) -> list[str] | None:
        """The healthy workers a vllm-router at ``url`` lists (``GET /workers``); None when it is no router.

        Raises:
            OSError: ``url`` did not answer (it may be a router that is not up yet).
        """
        status, raw = http_request("GET", url + "/workers", timeout=min(self.timeout, LOOKUP_TIMEOUT_S))
        if status != 200:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        workers = body.get("workers") if isinstance(body, dict) else None
        if not isinstance(workers, list) or not all(isinstance(w, dict) and isinstance(w.get("url"), str)
                                                    for w in workers):
            return None
        return [w["url"].rstrip("/") for w in workers if w.get("is_healthy", True) is not False]

    def _refresh_members(self, force: bool = False) -> None:
        """Read the routers' worker lists: at the start of a round when the last read is over
        :data:`MEMBERSHIP_S` old, waited for (each router answers within :data:`LOOKUP_TIMEOUT_S`);
        and after a failed request (``force``), in the background, so the retry does not wait on it.
        """
        with self._lock:
            now = time.monotonic()
            if self._routers == [] or (not force and now - self._members_at < MEMBERSHIP_S):
                return  # no router among the addresses: the members are the addresses
            if self._routers is not None and self._reading:
                return
            self._members_at = now
            self._reading = True
            first = self._routers is None
        if not force or first:
            self._read_members(first)
        else:
            threading.Thread(target=self._read_members, args=(False,), name="polar-members", daemon=True).start()

    def _read_members(self, first: bool) -> None:
        try:
            self._read_members_now(first)
        finally:
            with self._lock:
                self._reading = False

    def _read_members_now(self, first: bool) -> None:
        members, routers, unsure = [], [], False
        for url in self.urls:
            try:
                workers = self._workers(url)
            except OSError:  # down, or not up yet: a server for this round, asked again at the next
                workers, unsure = None, True
            if workers is None:
                members.append(url)
            else:
                routers.append(url)
                members.extend(workers)
        with self._lock:
            if first and not (unsure and not routers):
                self._routers = routers
        if routers or not first:
            self.fleet.set_members(members)

    def _keys(self, texts: list, keys: Sequence[str] | None) -> list[str]:
        if keys is not None:
            if len(keys) != len(texts):
                raise ValueError(f"{len(keys)} keys for {len(texts)} texts")
            return [str(k) for k in keys]
        # Texts: their prompt and reference part. Token ids carry no marker
        # that survives every tokenizer, so each is its own key (spread, no affinity).
        return [group_key(t.split(REWARD_SEP, 1)[0], None) if isinstance(t, str) else group_key(list(t), None)
                for t in texts]

    def score(self, texts: list, keys: Sequence[str] | None = None) -> list[float]:
        """Scores of texts (or, for vLLM, token-id lists), in order; raises instead of returning None.

        Args:
            texts: What the server is sent, one entry per answer.
            keys: Each text's :func:`polar_xtuner.scoring.fleet.group_key` of
                its prompt and reference: texts with equal keys go to one
                replica of a fleet. Without keys, a text's part before
                ``<|reward|>`` is its key (token ids: the whole ids).

        On one server, batches go out ``concurrency`` at a time. On a fleet,
        each replica gets its texts (grouped by key) in batches of its own,
        ``concurrency`` in flight each; the first failure that survives its
        retries (on the key's next replicas) is raised.
        """
        if not texts:
            return []
        self._refresh_members()
        keys = self._keys(texts, keys)
        where = self.fleet.assign(keys, self.routing)
        per: dict[str, list[int]] = {}
        for i, r in enumerate(where):
            per.setdefault(r, []).append(i)
        first_seen: dict[str, int] = {}
        for i, k in enumerate(keys):
            first_seen.setdefault(k, i)
        lanes = []
        for replica, idx in per.items():
            # a key's texts side by side (in one request where they fit), keys in order of appearance
            idx.sort(key=lambda i: first_seen[keys[i]])
            sub = [texts[i] for i in idx]
            slots = self.concurrency * (1 if len(self.fleet.replicas) > 1 else len(self.endpoints))
            lanes.append([(replica, idx[s:e]) for s, e in self.batches(sub, slots)])
        # one replica's batches after another's in turn, so every replica starts at once
        jobs = [job for row in _interleave(lanes) for job in row]
        live = self.fleet.live()
        out: list = [None] * len(texts)

        def post(job: tuple[str, list[int]]) -> None:
            replica, idx = job
            if self.routing == "prefix" and len(live) > 1:
                order = self.fleet.fallbacks(keys[idx[0]], replica)
            elif len(live) > 1:  # round robin: the next replicas in turn
                at = live.index(replica) if replica in live else 0
                order = live[at:] + live[:at]
            else:  # one live replica; the others (left out for now) are the retries' last resort
                order = [replica] + [r for r in self.fleet.replicas if r != replica]
            batch = [texts[i] for i in idx]
            self.fleet.begin(order[0], len(idx))
            try:
                scores, got = self._post(batch, order)
            except BadScoreError as e:
                raise BadScoreError(e.server_type, e.value, idx[e.index]) from None  # its place in ``texts``
            finally:
                self.fleet.end(order[0], len(idx))
            if got != replica and self.routing == "prefix":
                for k in {keys[i] for i in idx}:
                    self.fleet.moved(k, got)
            for i, s in zip(idx, scores):
                out[i] = s

        workers = min(len(jobs), self.concurrency * max(len(per), len(self.endpoints)))
        if workers == 1:
            for job in jobs:
                post(job)
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(post, job) for job in jobs]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out

    def served_dtype(self) -> str | None:
        """The dtype a vLLM server computes in, where it says (None otherwise).

        vLLM reports it only from ``/server_info``, which exists when the
        server runs with ``VLLM_SERVER_DEV_MODE=1`` (tools/serve.sh sets it on
        loopback addresses).
        """
        if self.server_type != "vllm":
            return None
        try:
            self._refresh_members()
            status, body = http_request("GET", self.fleet.live()[0] + "/server_info?config_format=json",
                                        timeout=self.timeout)
            if status != 200:
                return None
            info = json.loads(body)
            if isinstance(info.get("vllm_config"), str):  # older servers send it as text
                return None
            dtype = info["vllm_config"]["model_config"]["dtype"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return str(dtype).replace("torch.", "")
