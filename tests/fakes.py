"""Stand-ins for what tests talk to: one fake server (a POLAR server of any type, or a faulty one), verl's reward loop.

:class:`FakeServer` is the one loopback HTTP server of the tests. By default
it scores texts as sglang, vLLM or lmdeploy answer; an ``answer`` function
makes it anything else: a fixed reply (:func:`reply`), a network fault
(:func:`fault`), a trickled body (:func:`trickle`).
"""
import asyncio
import base64
import json
import math
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from polar_xtuner import rft

HOLD_S = 30.0  # the longest a fault holds a connection: a client without a deadline fails, not hangs
HALF_BODY = b'{"data": [{"index": 0, "data": [[0.5]]}, {"index": 1, "data": [[0.1]]}]}'


class FakeServer:
    """A loopback HTTP server that scores like a served POLAR model, or answers as ``answer`` says.

    Every request is recorded before it is answered. Use it as a context
    manager, or call :meth:`close`.

    Args:
        mode: "sglang", "vllm" or "lmdeploy": that server's answer (sglang's on /classify,
            the others' on /pooling); "fail": HTTP 500; anything else: HTTP 200 in a shape
            no client knows.
        model: Scores each text with this model, tokenized whole with ``tokenizer`` as a
            server does (or token ids, vLLM's input). Without a model or ``scores``, a
            text scores its length.
        tokenizer: The model's tokenizer.
        scores: Fixed scores, repeated over a request's texts, or a function of the texts.
        activation: vLLM's ``use_activation``: "honour" applies a sigmoid unless the request
            says ``false`` (vLLM >= 0.10); "always" and "never" ignore the field (a sigmoid
            always, or raw scores); "stall" answers raw scores but never answers a request
            that asks for the sigmoid (a probe that hangs).
        fail_first: The first N requests get HTTP 500.
        indices: How vLLM and lmdeploy entries are numbered (``"index"``): None, not at all;
            "order", each its own in request order; the rest list the entries last first:
            "reverse" with their own numbers, "duplicate" all 0, "missing" each one too
            high, "some" with the last one unnumbered.
        vllm_lists: vLLM answers JSON lists even when base64 is asked for (as older vLLM).
        answer: ``answer(request)`` answers every request instead of scoring: ``request``
            is the http.server handler, with ``.path``, ``.json`` (the body) and ``.fake``.
        protocol: "HTTP/1.1" keeps a connection open after an answer; "HTTP/1.0"
            (http.server's default) closes it.
        workers: Answers ``GET /workers`` as vllm-router does, with ``{"workers": workers()}``;
            None answers 404, as an engine does. Either way it is not recorded in ``requests``.

    Attributes:
        address: "127.0.0.1:PORT".
        requests: (path, JSON body or None) of each request, in arrival order.
        closed: Set by :meth:`close`: a fault holding a connection lets it go.
    """

    def __init__(self, mode="vllm", model=None, tokenizer=None, *, scores=None, activation="honour",
                 fail_first=0, indices=None, vllm_lists=False, answer=None, protocol="HTTP/1.0", workers=None):
        self.workers, self.lookups = workers, 0
        self.mode, self.model, self.tokenizer, self.fixed_scores = mode, model, tokenizer, scores
        self.activation, self.fail_first, self.indices, self.vllm_lists = activation, fail_first, indices, vllm_lists
        self.answer = answer or self.score_answer
        self.requests, self.closed = [], threading.Event()
        handler = type("Handler", (_Handler,), {"fake": self, "protocol_version": protocol})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        # close() waits for the serving loop to see the shutdown: it looks every 20 ms, not
        # every 0.5 s (the default), which cost every test half a second per server.
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def score(self, texts):
        """The raw scores of a request's texts (before any activation)."""
        if callable(self.fixed_scores):
            return self.fixed_scores(texts)
        if self.fixed_scores is not None:
            return [self.fixed_scores[i % len(self.fixed_scores)] for i in range(len(texts))]
        if self.model is None:
            return [float(len(t)) for t in texts]  # characters, or ids
        out = []
        with torch.no_grad():
            for t in texts:  # a text, or token ids (vLLM's prompt-ids input)
                ids = torch.tensor([t if isinstance(t, list) else self.tokenizer(t)["input_ids"]])
                out.append(self.model(input_ids=ids, attention_mask=torch.ones_like(ids))[0].item())
        return out

    def score_answer(self, request):
        """The answer of the server type ``mode``: its shape, activation and numbering as configured."""
        body = request.json
        if self.mode == "fail" or len(self.requests) <= self.fail_first:
            return send(request, 500, {"error": "overloaded"})
        if self.activation == "stall" and body.get("use_activation"):
            return silent(request)
        scores = self.score(body["text"] if request.path == "/classify" else body["input"])
        if self.mode == "sglang":
            return send(request, 200, [{"embedding": [s]} for s in scores])
        if self.mode == "vllm":  # per-token scores; the last one is the reward
            act = {"honour": body.get("use_activation", True), "always": True}.get(self.activation, False)
            if act:
                scores = [1 / (1 + math.exp(-s)) for s in scores]
            if body.get("encoding_format") == "base64" and not self.vllm_lists:  # every token's, as float32 bytes
                entries = [{"data": base64.b64encode(struct.pack("<2f", 0.0, s)).decode()} for s in scores]
            else:
                entries = [{"data": [[0.0], [s]]} for s in scores]
        elif self.mode == "lmdeploy":
            entries = [{"data": s} for s in scores]
        else:  # a wrong shape
            return send(request, 200, {"unexpected": True})
        send(request, 200, {"data": self._numbered(entries)})

    def _numbered(self, entries):
        if self.indices is None:
            return entries
        order = list(range(len(entries)))
        if self.indices != "order":
            order.reverse()
        numbers = {"order": order, "reverse": order, "duplicate": [0] * len(order),
                   "missing": [i + 1 for i in order], "some": order[:-1] + [None]}[self.indices]
        return [entries[i] if n is None else {"index": n, **entries[i]} for i, n in zip(order, numbers)]

    def close(self):
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeServer  # set per server, with protocol_version

    def log_message(self, *args):  # quiet: a test's output is its own
        pass

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.json = json.loads(self.rfile.read(length)) if length else None
        if self.command == "GET" and self.path == "/workers":
            # The client asks each address whether it is a router (vllm-router lists its workers
            # there); a server answers 404, as vLLM, sglang and lmdeploy do. Not a scoring request.
            self.fake.lookups += 1
            if self.fake.workers is None:
                return send(self, 404, {"detail": "Not Found"})
            return send(self, 200, {"workers": self.fake.workers()})
        self.fake.requests.append((self.path, self.json))
        try:
            self.fake.answer(self)
        except OSError:  # the client gave up (what a fault is for)
            self.close_connection = True


def send(request, status, body):
    """Answer ``request`` with HTTP ``status`` and ``body`` (JSON-encoded, or bytes as they are)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def reply(status, body):
    """An ``answer``: every request gets HTTP ``status`` and ``body`` (see :func:`send`)."""
    return lambda request: send(request, status, body)


def silent(request):
    """An ``answer`` that reads the request and never answers (until the server closes, HOLD_S at most)."""
    request.fake.closed.wait(HOLD_S)


def trickle(every, version="1.0"):
    """An ``answer``: headers promising a long JSON body, then a space every ``every`` seconds.

    ``every=None`` sends nothing after the headers (a stall). Either way the
    connection is held until the client gives up or the server closes
    (HOLD_S at most). ``version`` "1.0" is http.server's way: the connection
    closes with the response; "1.1" keeps it alive.
    """
    def answer(request):
        request.wfile.write(f"HTTP/{version} 200 OK\r\nContent-Type: application/json\r\n"
                            f"Content-Length: 1000000\r\n\r\n".encode())
        if every is None:
            return silent(request)
        for _ in range(int(HOLD_S / every)):
            if request.fake.closed.wait(every):
                return
            request.wfile.write(b" ")
    return answer


def half_body(request):
    """An ``answer``: a Content-Length twice the body it sends, then the connection closes."""
    request.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {2 * len(HALF_BODY)}\r\n\r\n".encode() + HALF_BODY)


def empty(request):
    """An ``answer``: HTTP 200 with an empty body."""
    request.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")


def fault(kind, every=0.1):
    """The ``answer`` of one network fault, by name (a trickle sends a byte every ``every`` seconds).

    silent, stall (headers, then nothing), trickle, trickle_keepalive (the
    same over HTTP/1.1 keep-alive), half_body, empty: see the functions above.
    """
    return {"silent": silent, "stall": trickle(None), "trickle": trickle(every),
            "trickle_keepalive": trickle(every, "1.1"), "half_body": half_body, "empty": empty}[kind]


def verl_rows(records):
    """What verl hands compute_score for rows written by tools/make_rft_data.py (parquet -> numpy)."""
    from polar_xtuner.rl.prompts import plain_messages

    out = []
    for r in records:
        prompt = np.array(plain_messages(r["prompt"]), dtype=object)
        out.append({"data_source": "polar", "ground_truth": np.array(plain_messages(r["reference"]), dtype=object),
                    "extra_info": {"prompt": prompt, "ability": "general", "split": "train", "index": 0,
                                   "num_turns": 2, "rollout_reward_scores": {}}})
    return out


def local_candidate_scores(model, tok, records, max_length=16384, max_response_length=4096):
    """Each record's chosen and rejected scored on its own (as RL scores one response at a time)."""
    from polar_xtuner.encoding import PolarEncoder
    from polar_xtuner.scoring.local import pad_id, score_ids

    enc = PolarEncoder(tok, max_length, max_response_length)
    items = [(r["prompt"], r["reference"], (r[k],)) for r in records for k in ("chosen", "rejected")]
    ids = enc.input_ids([t[0] for t in enc.texts(items)])
    return score_ids(model, ids, pad_id(tok))


async def verl_reward_loop(records, responses, **extra_reward_kwargs):
    """verl 0.9's NaiveRewardManager.run_single for every sample, gathered as RewardLoopWorker does."""
    rows = verl_rows(records)

    async def one(row, response):
        return await rft.compute_score(data_source=row["data_source"], solution_str=response,
                                       ground_truth=row["ground_truth"], extra_info=row["extra_info"],
                                       **extra_reward_kwargs)

    return await asyncio.gather(*(one(row, resp) for row, resp in zip(rows, responses)))
