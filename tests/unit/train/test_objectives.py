"""The loss options (margin, centering, fp32) against hand computations, and through the model."""
import math

import pytest
import torch

from common import build_reward_model, publish_varlen_args
from polar_xtuner.demo.data import generate
from polar_xtuner.encoding import PolarEncoder
from polar_xtuner.errors import ConfigError
from polar_xtuner.train.objectives import LossSettings, pair_loss_terms

C = [2.0, -1.0, 0.5, 3.0]
R = [1.0, 0.5, 0.5, -2.0]
M = [0.5, 0.0, 1.0, 2.0]


def _bt(c, r, m=0.0):
    return -math.log(1 / (1 + math.exp(-(c - r - m))))


def _terms(settings, margins=None, loss_type="ranking"):
    t = pair_loss_terms(torch.tensor(C), torch.tensor(R), settings,
                        None if margins is None else torch.tensor(margins), loss_type)
    return {k: v.item() for k, v in t.items()}


def test_published_loss_is_the_bradley_terry_mean():
    t = _terms(LossSettings(), M)  # margins present but the option is off: not used
    assert t["ranking"] == pytest.approx(sum(_bt(c, r) for c, r in zip(C, R)) / 4, rel=1e-6)
    assert t["center"] == 0 and t["loss"] == t["ranking"]


def test_margin_is_subtracted_from_each_pairs_gap():
    t = _terms(LossSettings(margin=True), M)
    assert t["loss"] == pytest.approx(sum(_bt(c, r, m) for c, r, m in zip(C, R, M)) / 4, rel=1e-6)
    # a larger margin asks for a larger gap: the loss grows
    assert t["loss"] > _terms(LossSettings())["loss"]


def test_centering_adds_c_times_mean_square_of_pair_sums():
    t = _terms(LossSettings(center_rewards_coefficient=0.01))
    center = 0.01 * sum((c + r) ** 2 for c, r in zip(C, R)) / 4
    assert t["center"] == pytest.approx(center, rel=1e-6)
    assert t["loss"] == pytest.approx(sum(_bt(c, r) for c, r in zip(C, R)) / 4 + center, rel=1e-6)


def test_focal_ranking_with_margin():
    t = _terms(LossSettings(margin=True), M, "focal")
    expected = 0.0
    for c, r, m in zip(C, R, M):
        p = 2 * max(0.0, 1 / (1 + math.exp(-(c - r - m))) - 0.5)
        expected += (1 - p) ** 2 * _bt(c, r, m)
    assert t["loss"] == pytest.approx(expected / 4, rel=1e-6)


def test_loss_in_fp32_on_bf16_scores():
    c, r = torch.tensor([0.30, 4.1]).bfloat16(), torch.tensor([0.21, 4.0]).bfloat16()
    exact = sum(_bt(a, b) for a, b in zip(c.float().tolist(), r.float().tolist())) / 2
    fp32 = pair_loss_terms(c, r, LossSettings(loss_in_fp32=True))["loss"]
    bf16 = pair_loss_terms(c, r, LossSettings())["loss"]
    assert fp32.dtype == torch.float32 and fp32.item() == pytest.approx(exact, rel=1e-6)
    assert bf16.dtype == torch.bfloat16 and abs(bf16.item() - exact) > 1e-4  # what fp32 avoids


@pytest.mark.parametrize("kw, msg", [
    (dict(margin=1.0), "margin must be True or False"),
    (dict(center_rewards_coefficient=-0.1), "center_rewards_coefficient must be a finite number >= 0"),
    (dict(center_rewards_coefficient=float("nan")), "center_rewards_coefficient"),
    (dict(center_rewards_coefficient="0.01"), "center_rewards_coefficient"),
    (dict(loss_in_fp32="yes"), "loss_in_fp32 must be True or False"),
])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LossSettings(**kw)


def test_bad_setting_in_the_model_exits_2_with_one_line(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        build_reward_model(tiny_dir, use_varlen_attn=False, center_rewards_coefficient=-1)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: center_rewards_coefficient")


def _pairs(tokenizer, n=5, seed=3):
    recs = list(generate(n, seed))
    for i, rec in enumerate(recs):
        rec["margin"] = [0.0, 0.5, 1.5, 3.0, 0.25][i % 5]
    feats = PolarEncoder(tokenizer, 512, 128).encode_pairs(recs)
    for rec, f in zip(recs, feats):
        f["margin"] = rec["margin"]
    return recs, feats


def _hand_loss(model, feats, settings, l2=0.0):
    """The loss from each pair scored alone, then the formulas by hand."""
    from polar_xtuner.scoring.local import score_ids
    from polar_xtuner.train.layout import WHOLE, row_layout

    ids = [x for f in feats for x in (f["chosen_ids"], f["rejected_ids"])]
    with row_layout(WHOLE):  # padded batches, each row one pair's sequence
        s = score_ids(model, ids, pad_id=0)
    total = 0.0
    for i, f in enumerate(feats):
        c, r = s[2 * i], s[2 * i + 1]
        total += _bt(c, r, f["margin"] if settings.margin else 0.0)
        total += settings.center_rewards_coefficient * (c + r) ** 2
        total += l2 * (c * c + r * r)
    return total / len(feats)


@pytest.mark.parametrize("packed", [False, True])
def test_model_loss_uses_each_pairs_own_margin(tiny_dir, tokenizer, packed):
    """Packed rows and padded batches give the margins to the right pairs."""
    from polar_xtuner.data.dataset import MarginPackedRows, polar_collate_fn

    settings = LossSettings(margin=True, center_rewards_coefficient=0.05, loss_in_fp32=True)
    model = build_reward_model(tiny_dir, use_varlen_attn=packed, margin=True, center_rewards_coefficient=0.05,
                               loss_in_fp32=True).eval()
    _, feats = _pairs(tokenizer)
    if packed:
        rows = MarginPackedRows(feats, max_packed_length=100000, shuffle_before_pack=False)
        assert len(rows) == 1 and rows[0]["margins"] == [f["margin"] for f in feats]
        batch = polar_collate_fn([rows[0]], use_varlen_attn=True)
    else:
        batch = polar_collate_fn(feats, use_varlen_attn=False)
    data = dict(batch["data"])
    assert data["margins"].tolist() == [f["margin"] for f in feats]
    if packed:
        publish_varlen_args(data.pop("cumulative_len")[0], data.pop("max_seqlen"))
    try:
        with torch.no_grad():
            out = model(data, mode="loss")
    finally:
        publish_varlen_args(None, None)
    with torch.no_grad():
        expected = _hand_loss(model, feats, settings)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["margin_mean"].item() == pytest.approx(sum(f["margin"] for f in feats) / len(feats))
    assert out["ranking_term"].item() + out["center_term"].item() == pytest.approx(out["loss"].item(), rel=1e-5)


def test_default_loss_equals_xtuners(tiny_dir, tokenizer):
    """Options off: the same loss as xtuner's RewardModel.compute_loss on the same model and batch."""
    from xtuner.model.reward import RewardModel

    from polar_xtuner.data.dataset import polar_collate_fn

    model = build_reward_model(tiny_dir, use_varlen_attn=False).eval()
    _, feats = _pairs(tokenizer)
    data = polar_collate_fn(feats, use_varlen_attn=False)["data"]
    with torch.no_grad():
        ours = model(dict(data), mode="loss")
        labels = data["labels"]
        plain = {k: v for k, v in data.items() if k not in ("labels", "margins")}
        stock = RewardModel.compute_loss(model, plain, labels)
    for key in ("loss", "acc", "chosen_score_mean", "rejected_score_mean"):
        assert ours[key].item() == pytest.approx(stock[key].item(), rel=1e-6), key


def test_margins_in_the_data_with_the_option_off_are_named_once(tiny_dir, tokenizer):
    from mmengine.logging import MMLogger

    from polar_xtuner.data.dataset import polar_collate_fn

    model = build_reward_model(tiny_dir, use_varlen_attn=False).eval()
    _, feats = _pairs(tokenizer)
    seen = []
    logger = MMLogger.get_current_instance()
    orig = logger.log
    logger.log = lambda level, msg, *a, **k: seen.append(msg)
    try:
        with torch.no_grad():
            for _ in range(2):
                model(dict(polar_collate_fn(feats, use_varlen_attn=False)["data"]), mode="loss")
    finally:
        logger.log = orig
    assert sum("margin = False" in str(m) for m in seen) == 1


def test_xtuners_l2_penalty_is_per_pair_squares(tiny_dir, tokenizer):
    """penalty_type="L2" adds w * mean over pairs of (s_c^2 + s_r^2): each score pulled to 0, not the pair's sum."""
    from polar_xtuner.data.dataset import polar_collate_fn

    model = build_reward_model(tiny_dir, use_varlen_attn=False, penalty_type="L2", penalty_weight=0.1).eval()
    _, feats = _pairs(tokenizer)
    with torch.no_grad():
        out = model(dict(polar_collate_fn(feats, use_varlen_attn=False)["data"]), mode="loss")
        expected = _hand_loss(model, feats, LossSettings(), l2=0.1)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
