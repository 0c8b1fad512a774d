"""PolarEvalHook in-process: the accuracy it logs is eval_pref's, on the model being trained."""
import types

import pytest

from common import VAL
from polar_xtuner.eval.metrics import accuracy, mean_margin
from polar_xtuner.records import load_records
from polar_xtuner.scoring.local import score_records
from polar_xtuner.train.eval_hook import PolarEvalHook


class Visualizer:
    def __init__(self):
        self.logged = []

    def add_scalars(self, scalars, step):
        self.logged.append((step, dict(scalars)))


def _runner(model, it=0):
    wrapper = types.SimpleNamespace(module=model)  # as DeepSpeed wraps the model
    return types.SimpleNamespace(model=wrapper, visualizer=Visualizer(), iter=it)


@pytest.fixture
def val24(tmp_path):
    """24 demo pairs: enough for accuracy and margin to differ between scorers that disagree."""
    path = tmp_path / "val.jsonl"
    with open(VAL) as src:
        path.write_text("".join(src.readlines()[:24]))
    return str(path)


def test_the_hook_logs_eval_prefs_accuracy_and_margin(tiny_model, tokenizer, val24):
    hook = PolarEvalHook(val24, tokenizer, interval=5, max_length=512, max_response_length=128, batch_size=7)
    runner = _runner(tiny_model, it=4)
    hook.before_train(runner)
    assert len(hook._ids) == 48
    tiny_model.train()
    try:
        hook.after_train_iter(runner, batch_idx=4)  # iteration 5 has ended: an interval
        assert tiny_model.training  # the hook puts the mode back
    finally:
        tiny_model.eval()
    want = score_records(tiny_model, tokenizer, load_records(val24), 512, 128, batch_size=16)
    step, scalars = runner.visualizer.logged[-1]
    assert step == 5 and hook.history == [(5, scalars["val/pref_accuracy"])]
    assert scalars["val/pref_accuracy"] == pytest.approx(accuracy(want), abs=1e-9)
    assert scalars["val/margin"] == pytest.approx(mean_margin(want), abs=1e-4)


def test_the_hook_evaluates_once_more_at_the_end_unless_it_just_did(tiny_model, tokenizer, val24):
    hook = PolarEvalHook(val24, tokenizer, interval=100, max_length=512, max_response_length=128)
    runner = _runner(tiny_model, it=9)
    hook.before_train(runner)
    hook.after_train_iter(runner, batch_idx=9)  # iteration 10: not an interval
    assert runner.visualizer.logged == []
    runner.iter = 10
    hook.after_train(runner)
    hook.after_train(runner)
    assert [step for step, _ in runner.visualizer.logged] == [10] and hook.history[0][0] == 10


def test_a_bad_val_file_fails_before_training(tmp_path, tokenizer):
    from polar_xtuner.records import DataError

    bad = tmp_path / "val.jsonl"
    bad.write_text('{"prompt": "q", "reference": "r", "chosen": "a"}\n')
    hook = PolarEvalHook(str(bad), tokenizer)
    with pytest.raises(DataError, match="val.jsonl:1"):
        hook.before_train(_runner(None))


def test_shared_prefix_evaluation_gives_the_unshared_scores(tiny_dir, tokenizer, tmp_path):
    """shared_prefix=True: rows of groups through the training model's own attention; same pairs, same scores."""
    import torch

    from common import build_reward_model
    from common import publish_varlen_args as publish
    from polar_xtuner.train.layout import WHOLE, MissingLayoutError, row_layout

    from polar_xtuner.eval.metrics import unflatten
    from polar_xtuner.scoring.local import score_ids

    recs = load_records(VAL)[:30]
    recs += [{**recs[i], "chosen": recs[i + 10]["chosen"]} for i in range(8)]  # shared prompts and references
    path = tmp_path / "val.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in recs))
    model = build_reward_model(tiny_dir).train()  # checkpointing on, mid-training, as the shipped recipes
    hooks = {s: PolarEvalHook(str(path), tokenizer, shared_prefix=s, row_tokens=600) for s in (True, False)}
    for hook in hooks.values():
        hook.before_train(_runner(model))
    assert len(hooks[True]._groups) < len(recs)  # the extra records joined their prompt's group
    # A training row's bounds still published (the hook's order among after_train_iter
    # hooks must not matter): evaluation declares its own layouts.
    publish(torch.tensor([0, 5, 11], dtype=torch.int32), 6)
    try:
        accs = {s: hook.evaluate(_runner(model), 1) for s, hook in hooks.items()}
    finally:
        publish(None, None)
    assert accs[True] == accs[False] and model.training
    from polar_xtuner.train.eval_hook import score_shared_rows

    h = hooks[True]
    model.eval()
    shared = score_shared_rows(model, h._groups, 600)
    pairs = [(shared[g][i], shared[g][j]) for g, i, j in h._where]
    assert h._ids == hooks[False]._ids  # the groups rebuild exactly the encoder's sequences
    with row_layout(WHOLE):
        plain = unflatten(score_ids(model, hooks[False]._ids, h._pad, "right"))
    assert max(abs(a - b) for p, q in zip(pairs, plain) for a, b in zip(p, q)) <= 1e-5
    with pytest.raises(MissingLayoutError):  # a forward that brings no layout is refused, never whole-row
        score_ids(model, hooks[False]._ids[:2], h._pad, "right")
