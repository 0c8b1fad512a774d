"""Score held-out demo pairs through the real verl and OpenRLHF code paths.

Runs in the RL venv (`make rl-setup`: verl 0.9.1 and OpenRLHF 0.11.2), with
the repository on PYTHONPATH, against a running POLAR server:

    .venv-rl/bin/python tests/assets/rl_frameworks.py MODEL_DIR HOST:PORT VAL.jsonl OUT.json

* verl: ``get_custom_reward_fn`` loads ``pkg://polar_xtuner.rft`` /
  ``compute_score`` with the server in ``reward_kwargs``; ``NaiveRewardManager``
  (the reward loop's default) runs every sample of one DataProto batch, gathered
  as ``RewardLoopWorker.compute_score_batch`` does.
* OpenRLHF: ``SingleTurnAgentExecutor`` loads ``polar_xtuner/rft.py`` as a
  ``--reward.remote_url`` file and, per sample, builds the query from the
  templated prompt and a "generated" response (a stand-in engine returns the
  candidate's token ids), then calls ``reward_func``.

Writes {"verl": [...], "openrlhf": [...]}: one score per candidate, chosen then
rejected for each record.
"""
import asyncio
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch


def candidates(val_path):
    from polar_xtuner.records import load_records

    out = []
    for rec in load_records(val_path):
        for key in ("chosen", "rejected"):
            out.append((rec, rec[key][0]["content"]))
    return out


def run_verl(model_dir, address, items, tokenizer):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from polar_xtuner.rl.prompts import plain_messages

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://polar_xtuner.rft", "name": "compute_score",
        "reward_kwargs": {"polar_server_address": address, "polar_model": model_dir}}}})
    fn = get_custom_reward_fn(config)
    # verl pads prompts on the left and responses on the right; the mask covers both.
    prompts = [tokenizer(r["prompt"][-1]["content"], add_special_tokens=False)["input_ids"] for r, _ in items]
    responses = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, c in items]
    pl, rl = max(map(len, prompts)), max(map(len, responses))
    pad = tokenizer.pad_token_id
    p_ids = torch.full((len(items), pl), pad)
    r_ids = torch.full((len(items), rl), pad)
    mask = torch.zeros((len(items), pl + rl), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids[i, pl - len(p):] = torch.tensor(p)
        r_ids[i, :len(r)] = torch.tensor(r)
        mask[i, pl - len(p):pl] = 1
        mask[i, pl:pl + len(r)] = 1
    non_tensor = {
        "data_source": np.array(["polar"] * len(items), dtype=object),
        "reward_model": np.array([{"style": "polar", "ground_truth": np.array(plain_messages(r["reference"]),
                                                                              dtype=object)}
                                  for r, _ in items], dtype=object),
        "extra_info": np.array([{"prompt": np.array(plain_messages(r["prompt"]), dtype=object), "ability": "general",
                                 "split": "test", "index": i} for i, (r, _) in enumerate(items)], dtype=object),
    }
    data = DataProto.from_dict(tensors={"prompts": p_ids, "responses": r_ids, "attention_mask": mask,
                                        "input_ids": torch.cat([p_ids, r_ids], 1)},
                               non_tensors=non_tensor)
    manager = NaiveRewardManager(config, tokenizer, fn)

    async def batch():
        tasks = [asyncio.create_task(manager.run_single(data[i:i + 1])) for i in range(len(data))]
        return await asyncio.gather(*tasks)

    outs = manager.loop.run_until_complete(batch())
    return [float(o["reward_score"]) for o in outs]


def run_openrlhf(model_dir, address, items, tokenizer):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    import polar_xtuner.rft as rft

    os.environ.update(POLAR_SERVER_ADDRESS=address, POLAR_MODEL=model_dir)
    executor = SingleTurnAgentExecutor(remote_rm_url=rft.__file__)

    class Engine:  # stands in for vLLM: "generates" the candidate answer, then EOS
        def __init__(self, ids):
            self.ids = ids

        async def generate(self, prompt_token_ids, params, multi_modal_data=None):
            return SimpleNamespace(outputs=[SimpleNamespace(token_ids=self.ids, finish_reason="stop",
                                                            logprobs=None)])

    async def one(rec, cand):
        prompt = f"<|im_start|>user\n{rec['prompt'][-1]['content']}<|im_end|>\n<|im_start|>assistant\n"
        label = json.dumps({"prompt": rec["prompt"], "reference": rec["reference"]}, ensure_ascii=False)
        ids = tokenizer(cand, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out = await executor.execute(prompt, label, SimpleNamespace(max_tokens=64, logprobs=None), 1024,
                                     tokenizer, Engine(ids))
        if out["reward"] is None:
            raise RuntimeError(f"OpenRLHF got no reward: {out.get('extra_logs')}")
        return float(torch.as_tensor(out["reward"]).flatten()[0])

    async def run():
        return await asyncio.gather(*(one(r, c) for r, c in items))

    return asyncio.run(run())


def main(argv):
    model_dir, address, val, out = argv
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = candidates(val)
    result = {"verl": run_verl(model_dir, address, items, tokenizer),
              "openrlhf": run_openrlhf(model_dir, address, items, tokenizer)}
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
