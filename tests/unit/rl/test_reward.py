"""polar_xtuner.rft, called as verl and OpenRLHF call it, against loopback servers.

verl 0.9 and OpenRLHF 0.11 need ray (and OpenRLHF flash-attn) to import, so
these tests make their calls as their source does (verl's reward loop:
``await compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **extra_reward_kwargs)`` for every sample of a batch at once;
verl's batch manager: ``compute_score_batch(data_sources=..., solution_strs=...,
ground_truths=..., extra_infos=...)``; OpenRLHF: ``reward_func([query],
[prompt], [label])`` from a thread per sample). The real-engine versions are in
tests/integration/test_serving.py.
"""
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from common import load_tool, polar_env, run_tool
from fakes import FakeServer, local_candidate_scores, verl_reward_loop, verl_rows
from polar_xtuner import rft
from polar_xtuner.scoring.client import RemoteScorer, RemoteScoringError
from polar_xtuner.demo.data import generate

pytestmark = pytest.mark.usefixtures("fresh_rft")


def test_verl_reward_loop_gathers_calls_and_equals_local(monkeypatch, tiny_dir, tiny_model, tokenizer):
    recs = list(generate(32, 21))
    server = FakeServer("vllm", tiny_model, tokenizer)
    polar_env(monkeypatch, server, tiny_dir, POLAR_BATCH_SIZE=16)
    try:
        responses = [r["chosen"][0]["content"] for r in recs]
        got = asyncio.run(verl_reward_loop(recs, responses))
    finally:
        server.close()
    local = local_candidate_scores(tiny_model, tokenizer, recs)[0::2]
    assert torch.allclose(torch.tensor(got), torch.tensor(local), atol=1e-4)
    scored = [b for _, b in server.requests if b.get("use_activation") is False]
    assert len(scored) <= 4  # 32 concurrent calls in batches of 16, not 32 requests
    assert all(isinstance(s, float) for s in got)


def test_a_verl_sized_batch_goes_out_in_few_requests(monkeypatch, tiny_dir):
    recs = list(generate(1024, 29))
    server = FakeServer("vllm")  # scores each input by its length: cheap, still checked in order
    polar_env(monkeypatch, server, tiny_dir, POLAR_BATCH_SIZE=64)
    try:
        got = asyncio.run(verl_reward_loop(recs, [r["chosen"][0]["content"] for r in recs]))
    finally:
        server.close()
    scored = [b["input"] for _, b in server.requests if b.get("use_activation") is False]
    assert sum(len(x) for x in scored) == 1024 and max(len(x) for x in scored) == 64
    assert len(scored) <= 20, len(scored)  # 1024 responses in about 16 requests, not 1024
    reward = rft.loaded_rewards()[0]
    inputs = reward.inputs([r["prompt"] for r in recs], [r["reference"] for r in recs],
                           [r["chosen"][0]["content"] for r in recs])
    expected = [float(len(ids)) for ids in inputs]
    assert got == expected  # every caller got its own response's score


def test_batch_manager_and_openrlhf_give_the_same_scores(monkeypatch, tiny_dir, tiny_model, tokenizer):
    recs = list(generate(12, 22))
    servers = [FakeServer("vllm", tiny_model, tokenizer) for _ in range(2)]
    polar_env(monkeypatch, ",".join(s.address for s in servers), tiny_dir, POLAR_BATCH_SIZE=4)
    try:
        rows = verl_rows(recs)
        responses = [r[k][0]["content"] for r in recs for k in ("chosen", "rejected")]
        doubled = [row for row in rows for _ in range(2)]
        batch = rft.compute_score_batch(
            data_sources=np.array([r["data_source"] for r in doubled], dtype=object), solution_strs=responses,
            ground_truths=[r["ground_truth"] for r in doubled], extra_infos=[r["extra_info"] for r in doubled])
        # OpenRLHF: the query is the chat-templated prompt + response + EOS, decoded with special tokens
        templated = [f"<|im_start|>user\n{r['prompt'][-1]['content']}<|im_end|>\n<|im_start|>assistant\n"
                     for r in recs for _ in range(2)]
        labels = [json.dumps({"prompt": r["prompt"], "reference": r["reference"]}) for r in recs for _ in range(2)]

        def openrlhf_call(i):
            out = rft.reward_func([templated[i] + responses[i] + "<|im_end|>"], [templated[i]], [labels[i]])
            assert set(out) == {"rewards", "scores", "extra_logs"} and out["rewards"].shape == (1,)
            return out["rewards"].item()

        with ThreadPoolExecutor(8) as pool:
            orl = list(pool.map(openrlhf_call, range(len(responses))))
    finally:
        for s in servers:
            s.close()
    local = local_candidate_scores(tiny_model, tokenizer, recs)
    assert torch.allclose(torch.tensor(batch), torch.tensor(local), atol=1e-4)
    assert torch.allclose(torch.tensor(orl), torch.tensor(local), atol=1e-4)
    assert all(len(s.requests) > 0 for s in servers)  # both addresses took a share


def test_reward_kwargs_from_verl_config_set_the_server(monkeypatch, tiny_dir, tiny_model, tokenizer):
    recs = list(generate(4, 28))
    server = FakeServer("vllm", tiny_model, tokenizer)
    try:  # nothing in the environment: verl's reward_kwargs carry the settings
        got = asyncio.run(verl_reward_loop(recs, [r["chosen"][0]["content"] for r in recs],
                                           polar_server_address=server.address, polar_model=tiny_dir))
        with pytest.raises(rft.RFTConfigError, match="unknown reward kwarg 'polar_adress'"):
            asyncio.run(verl_reward_loop(recs[:1], ["x"], polar_adress=server.address))
    finally:
        server.close()
    local = local_candidate_scores(tiny_model, tokenizer, recs)[0::2]
    assert torch.allclose(torch.tensor(got), torch.tensor(local), atol=1e-4)


def test_router_address_from_verl_is_used(monkeypatch, tiny_dir, tiny_model, tokenizer):
    recs = list(generate(4, 23))
    configured = FakeServer("vllm", tiny_model, tokenizer)
    router = FakeServer("vllm", tiny_model, tokenizer)
    monkeypatch.setenv("POLAR_SERVER_ADDRESS", configured.address)  # no POLAR_MODEL: verl's tokenizer serves
    try:
        got = asyncio.run(verl_reward_loop(recs, [r["chosen"][0]["content"] for r in recs],
                                           reward_router_address=router.address, reward_model_tokenizer=tokenizer))
    finally:
        configured.close()
        router.close()
    assert len(router.requests) > 0 and len(configured.requests) == 0
    local = local_candidate_scores(tiny_model, tokenizer, recs)[0::2]
    assert torch.allclose(torch.tensor(got), torch.tensor(local), atol=1e-4)


def test_dead_server_raises_and_fallback_is_opt_in_and_counted(monkeypatch, tiny_dir, caplog):
    dead = FakeServer("fail")
    recs = list(generate(3, 24))
    polar_env(monkeypatch, dead, tiny_dir, POLAR_MAX_RETRIES=2)
    monkeypatch.setattr(RemoteScorer, "backoff", 0.01)
    try:
        with pytest.raises(RemoteScoringError, match="HTTP 500"):
            asyncio.run(verl_reward_loop(recs, ["x"] * 3))
        rows = verl_rows(recs)
        with pytest.raises(RemoteScoringError):
            rft.compute_score_batch(["polar"] * 3, ["x"] * 3, [r["ground_truth"] for r in rows],
                                    [r["extra_info"] for r in rows])
        rft.forget_rewards()
        monkeypatch.setenv("POLAR_FALLBACK_SCORE", "-5")
        got = asyncio.run(verl_reward_loop(recs, ["x"] * 3))
    finally:
        dead.close()
    assert got == [-5.0] * 3
    assert rft.loaded_rewards()[0].fallback_uses == 3
    assert "using the fallback score -5.0 (3 use(s) so far)" in caplog.text


def test_thinking_is_stripped_unless_turned_off(monkeypatch, tiny_dir, tiny_model, tokenizer):
    assert rft.strip_thinking("<think>maybe red</think>\nThe answer is blue.") == "The answer is blue."
    assert rft.strip_thinking("so red?</think> Blue.") == "Blue."  # opening tag was in the template
    assert rft.strip_thinking("<think>never finished") == ""
    assert rft.strip_thinking("a <think>x</think>b<think>y</think> c") == "a b c"
    recs = list(generate(2, 25))
    server = FakeServer("vllm", tiny_model, tokenizer)
    polar_env(monkeypatch, server, tiny_dir)
    try:
        plain = [r["chosen"][0]["content"] for r in recs]
        thought = ["<think>Let me compare with something else.</think>" + p for p in plain]
        a = asyncio.run(verl_reward_loop(recs, plain))
        b = asyncio.run(verl_reward_loop(recs, thought))
        rft.forget_rewards()
        monkeypatch.setenv("POLAR_STRIP_THINKING", "0")
        c = asyncio.run(verl_reward_loop(recs, thought))
    finally:
        server.close()
    assert a == b and c != a


def test_settings_errors_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("POLAR_BATCH_SIZE", "0")
    with pytest.raises(rft.RFTConfigError, match="POLAR_BATCH_SIZE='0'"):
        rft.RFTSettings.from_env()
    monkeypatch.setenv("POLAR_BATCH_SIZE", "8")
    monkeypatch.setenv("POLAR_BATCH_TOKENS", "1.5")
    with pytest.raises(rft.RFTConfigError, match="POLAR_BATCH_TOKENS='1.5'.*whole number"):
        rft.RFTSettings.from_env()
    monkeypatch.setenv("POLAR_BATCH_TOKENS", "4096")
    assert rft.RFTSettings.from_env().batch_tokens == 4096
    monkeypatch.setenv("POLAR_SERVER_TYPE", "triton")
    with pytest.raises(rft.RFTConfigError, match="POLAR_SERVER_TYPE"):
        rft.RFTSettings.from_env()
    monkeypatch.delenv("POLAR_SERVER_TYPE")
    cfg = tmp_path / "polar.json"
    cfg.write_text(json.dumps({"server_address": "127.0.0.1:1", "normalize": True, "fallback_score": 0}))
    monkeypatch.setenv("POLAR_CONFIG", str(cfg))
    s = rft.RFTSettings.from_env()
    assert (s.server_address, s.normalize, s.fallback_score, s.batch_size) == ("127.0.0.1:1", True, 0.0, 8)
    cfg.write_text(json.dumps({"addres": "x"}))
    with pytest.raises(rft.RFTConfigError, match="unknown key.*addres"):
        rft.RFTSettings.from_env()
    monkeypatch.delenv("POLAR_CONFIG")
    with pytest.raises(rft.RFTConfigError, match="POLAR_SERVER_ADDRESS is not set"):
        rft.get_reward()
    with pytest.raises(ValueError, match="no prompt"):
        asyncio.run(rft.compute_score("polar", "x", "ref", {"split": "train"}))
    with pytest.raises(ValueError, match="plain string"):
        rft.parse_label("just a reference")


def test_the_output_format_follows_the_extension(tmp_path):
    """A .jsonl output is JSON Lines and a .parquet one Parquet; a --format that contradicts the name is refused."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generate(3, 5)))
    out = tmp_path / "rl.jsonl"
    proc = run_tool("python", "tools/make_rft_data.py", str(src), "-o", str(out))  # no --format: the name decides
    assert proc.returncode == 0, proc.stderr
    assert [sorted(json.loads(line)) for line in open(out)] == [["label", "prompt"]] * 3
    pq = tmp_path / "rl.parquet"
    assert run_tool("python", "tools/make_rft_data.py", str(src), "-o", str(pq)).returncode == 0
    assert pq.read_bytes()[:4] == b"PAR1"
    for name, fmt, message in [("x.parquet", "openrlhf", "--format openrlhf writes .jsonl, but --out"),
                               ("x.jsonl", "verl", "--format verl writes .parquet, but --out"),
                               ("x.txt", None, "the extension must be .parquet (verl) or .jsonl (openrlhf)"),
                               ("x", "verl", "got none")]:
        proc = run_tool("python", "tools/make_rft_data.py", str(src), "-o", str(tmp_path / name),
                        *(["--format", fmt] if fmt else []))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (name, proc.stderr)
        assert not (tmp_path / name).exists()


def test_the_file_loads_by_path_as_openrlhf_and_verl_load_it():
    """OpenRLHF execs rft.py as a module named "reward_func", outside the package (verl's path= alike)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reward_func", rft.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a dataclass or relative import here would fail
    assert module.reward_func is rft.reward_func and module.compute_score is rft.compute_score
    assert module.loaded_rewards is rft.loaded_rewards  # one copy of the state, however it was loaded


def test_evaluation_and_rl_share_one_set_of_remote_defaults():
    import dataclasses

    from polar_xtuner.scoring.client import RemoteScorer, RemoteSettings
    from polar_xtuner.rl.reward import RFTSettings

    # one settings class: RL's extends evaluation's, and the scorer it builds carries every value
    assert issubclass(RFTSettings, RemoteSettings)
    remote = {f.name: f.default for f in dataclasses.fields(RemoteSettings)}
    assert {f.name: f.default for f in dataclasses.fields(RFTSettings) if f.name in remote} == remote
    scorer = {f.name: f.default for f in dataclasses.fields(RemoteScorer)}
    for key in ("timeout", "max_retries", "batch_size", "batch_tokens", "concurrency"):
        assert remote[key] == scorer[key], key
    built = RFTSettings(server_type="sglang", server_address="h:1", timeout=7, max_retries=2, batch_size=3,
                        batch_tokens=5, concurrency=6).scorer(model_name="M")
    assert (built.server_type, built.urls, built.timeout, built.max_retries, built.batch_size, built.batch_tokens,
            built.concurrency, built.model_name) == ("sglang", ["http://h:1"], 7, 2, 3, 5, 6, "M")
    args = load_tool("eval_pref").parse_args(["--model", "M", "--data", "D.jsonl"])
    assert (args.timeout, args.max_retries, args.concurrency, args.batch_tokens) == (
        scorer["timeout"], scorer["max_retries"], scorer["concurrency"], scorer["batch_tokens"])
