"""Stand-ins for what tests talk to: a POLAR server of any type, and verl's reward loop."""
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


class FakePolarServer:
    """Scores texts with the tiny model, tokenizing the whole text as a server does."""

    def __init__(self, mode, model=None, tokenizer=None, fail_first=0, activation="honour", scores=None):
        # activation (vllm): "honour" applies a sigmoid unless the request says
        # "use_activation": false (vLLM >= 0.10); "always" ignores the field and
        # applies it; "never" ignores the field and answers raw scores.
        self.mode, self.model, self.tokenizer = mode, model, tokenizer
        self.activation, self.fixed_scores = activation, scores
        self.fail_first, self.requests = fail_first, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if server.mode == "fail" or len(server.requests) <= server.fail_first:
                    return self._send(500, {"error": "overloaded"})
                texts = body["text"] if self.path == "/classify" else body["input"]
                scores = server.score(texts)
                if server.mode == "sglang":
                    out = [{"embedding": [s]} for s in scores]
                elif server.mode == "vllm":  # per-token scores; the last one is the reward
                    act = {"honour": body.get("use_activation", True), "always": True, "never": False}
                    if act[server.activation]:
                        scores = [1 / (1 + math.exp(-s)) for s in scores]
                    if body.get("encoding_format") == "base64":  # float32 bytes of every token's score
                        out = {"data": [{"data": base64.b64encode(struct.pack("<2f", 0.0, s)).decode()}
                                        for s in scores]}
                    else:
                        out = {"data": [{"data": [[0.0], [s]]} for s in scores]}
                elif server.mode == "lmdeploy":
                    out = {"data": [{"data": s} for s in scores]}
                else:  # a wrong shape
                    out = {"unexpected": True}
                self._send(200, out)

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def score(self, texts):
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

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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
