"""Scores from a served POLAR model (sglang, vllm or lmdeploy).

Texts come from :meth:`polar_xtuner.encoding.PolarEncoder.serving_texts`, the
same encoding as training. Each backend's request and response shape follows
POLAR's published client:

=========  ===================================  ================================
server     request                              score in the response
=========  ===================================  ================================
sglang     POST /classify {"model", "text"}     ``response[i]["embedding"][0]``
vllm       POST /pooling {"input"}              ``data[i]["data"][-1][0]``
lmdeploy   POST /pooling {"input"}              ``data[i]["data"]``
=========  ===================================  ================================

Unlike that client, a failed request never turns into ``None``: requests time
out, are retried a bounded number of times with backoff, and then raise
:class:`RemoteScoringError` with the last status and a snippet of the body.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

SERVER_TYPES = ("sglang", "vllm", "lmdeploy")


class RemoteScoringError(RuntimeError):
    """The server could not be reached or answered in an unexpected shape."""


def parse_scores(server_type: str, body, n: int) -> list[float]:
    """Read n scores from a server's JSON body.

    Raises:
        RemoteScoringError: The body does not have the backend's shape.
    """
    try:
        if server_type == "sglang":
            scores = [float(e["embedding"][0]) for e in body]
        elif server_type == "vllm":
            scores = [float(e["data"][-1][0]) for e in body["data"]]
        elif server_type == "lmdeploy":
            scores = [float(e["data"]) for e in body["data"]]
        else:
            raise RemoteScoringError(f"unknown server type {server_type!r}")
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise RemoteScoringError(
            f"{server_type} answered in an unexpected shape ({type(e).__name__}: {e}): {str(body)[:200]}"
        ) from None
    if len(scores) != n:
        raise RemoteScoringError(f"{server_type} returned {len(scores)} scores for {n} texts")
    return scores


@dataclass
class RemoteScorer:
    """Scores texts on a POLAR server.

    Args:
        server_type: "sglang", "vllm" or "lmdeploy".
        address: "host:port" (or a full http:// URL).
        model_name: The served model's name (sglang's "model" field).
        timeout: Seconds per request.
        max_retries: Attempts per batch before giving up.
        backoff: Seconds before the first retry, doubled after each.
        batch_size: Texts per request.
    """

    server_type: str
    address: str
    model_name: str = "POLAR"
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 0.5
    batch_size: int = 32

    def __post_init__(self):
        if self.server_type not in SERVER_TYPES:
            raise ValueError(f"server type must be one of {', '.join(SERVER_TYPES)}, got {self.server_type!r}")
        if self.max_retries < 1:
            raise ValueError("max_retries must be >= 1")
        base = self.address if self.address.startswith(("http://", "https://")) else f"http://{self.address}"
        path = "/classify" if self.server_type == "sglang" else "/pooling"
        self.url = base.rstrip("/") + path

    def _payload(self, texts):
        if self.server_type == "sglang":
            return {"model": self.model_name, "text": texts}
        return {"input": texts}

    def _post(self, texts: list[str]) -> list[float]:
        import requests

        last = "no attempt"
        for attempt in range(self.max_retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                res = requests.post(self.url, json=self._payload(texts), timeout=self.timeout)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if res.status_code >= 500 or res.status_code == 429:  # worth retrying
                last = f"HTTP {res.status_code}: {res.text[:200]}"
                continue
            if res.status_code != 200:
                raise RemoteScoringError(f"{self.url} answered HTTP {res.status_code}: {res.text[:200]}")
            try:
                body = res.json()
            except ValueError:
                raise RemoteScoringError(f"{self.url} answered non-JSON: {res.text[:200]}") from None
            return parse_scores(self.server_type, body, len(texts))
        raise RemoteScoringError(f"{self.url} failed after {self.max_retries} attempt(s); last error: {last}")

    def score(self, texts: list[str]) -> list[float]:
        """Scores of texts, in order; raises instead of returning None."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._post(texts[i:i + self.batch_size]))
        return out


def score_records_remote(scorer: RemoteScorer, tokenizer, records, max_length=16384,
                         max_response_length=4096) -> list[tuple[float, float]]:
    """(chosen, rejected) scores of records from a served model."""
    from .encoding import PolarEncoder, pair_items

    enc = PolarEncoder(tokenizer, max_length, max_response_length)
    texts = enc.serving_texts(pair_items(records), [r.get("wrapper", "sft") for r in records])
    flat = scorer.score(texts)
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(records))]
