"""The recipes' warm-up and annealing are right on any epoch length.

mmengine truncates 3% of the epoch to whole iterations: under 34 iterations the
warm-up ended at 0 and mmengine refused to start (`end should be larger than
begin`; the 1.8B recipe on the 4,000 demo pairs, 15 packed rows, stopped there),
and from 34 to 66 a one-iteration warm-up never ramped, so the run trained
below a tenth of its rate (climbing from 1e-6 of it towards eta_min). Every config's schedule is stepped here through epochs of
1 to 120 iterations.
"""
import glob
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import CosineAnnealingLR, LinearLR

from common import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "POLAR_*.py")))


def _rates(cfg, n: int, classes=None) -> list[float]:
    """The rate of each of n iterations under the config's two schedulers (or other classes)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheds = []
    for i, sched in enumerate(cfg.param_scheduler):
        kwargs = {k: v for k, v in sched.items() if k not in ("type", "convert_to_iter_based")}
        cls = classes[i] if classes else sched["type"]
        scheds.append(cls.build_iter_from_epoch(opt, epoch_length=n, **kwargs))
    rates = []
    for _ in range(n * cfg.max_epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        for s in scheds:
            s.step()
    return rates


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_reaches_its_rate_on_any_epoch_length(path):
    cfg = Config.fromfile(path)
    for n in range(1, 121):
        rates = _rates(cfg, n)
        top = max(rates)
        assert top == pytest.approx(cfg.lr, rel=1e-6), (n, rates[:4])  # the full rate is reached
        if n >= 4:
            assert rates[0] < 1e-3 * cfg.lr  # and warmed up to, from near zero
        assert rates[-1] >= cfg.lr * 0.1 * (1 - 1e-6)  # annealed to eta_min at the lowest
        if n >= 67:  # where mmengine's own conversion was right, it is unchanged
            assert rates == pytest.approx(_rates(cfg, n, (LinearLR, CosineAnnealingLR)), rel=1e-9, abs=0)


def test_stock_conversion_fails_or_never_ramps_where_ours_is_right():
    cfg = Config.fromfile(CONFIGS[0])
    stock = (LinearLR, CosineAnnealingLR)
    with pytest.raises(ValueError, match="end should be larger than begin"):
        _rates(cfg, 15, stock)
    # the silent case, 40 iterations: no ramp, and the annealing climbs from 1e-6 of the rate to eta_min
    silent = _rates(cfg, 40, stock)
    assert silent[0] < 1e-5 * cfg.lr and max(silent) <= cfg.lr * 0.1 * (1 + 1e-6)
    assert max(_rates(cfg, 15)) == max(_rates(cfg, 40)) == pytest.approx(cfg.lr)
