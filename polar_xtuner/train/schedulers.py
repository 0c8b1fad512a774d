"""The recipes' learning-rate schedule, right on epochs of any length.

The configs warm up linearly over ``warmup_ratio`` (3%) of the epoch from
``lr * 0.1`` times the rate (so from near zero), then anneal. mmengine's
``convert_to_iter_based`` truncates that share to whole iterations, and its
LinearLR reaches the full rate only at the warm-up's second iteration or later:

* under 34 iterations the warm-up was 0 iterations, and mmengine refused to
  start (``end should be larger than begin``; the 1.8B recipe on the 4,000
  demo pairs makes 15 packed rows);
* from 34 to 66 iterations it was 1 iteration, which never ramps: the whole
  run trained below a tenth of the rate (the annealing climbed from 1e-6 of
  it towards ``eta_min``), silently.

Here a warm-up is at least two iterations (so it reaches the rate), at most
half the epoch, and none at all under four iterations; the annealing begins
where the warm-up ends. From 67 iterations on, nothing changes.
"""

from __future__ import annotations

from mmengine.optim import CosineAnnealingLR, LinearLR
from mmengine.optim.scheduler.param_scheduler import INF


def iteration_boundary(share: float, epoch_length: int) -> int:
    """``share`` of the epoch in whole iterations, as the warm-up's end or the annealing's begin.

    Whole epochs (``share >= 1``) convert as mmengine converts them; a share
    of an epoch is at least 2 iterations and at most half the epoch (1 when
    the epoch is under 4 iterations: then there is no warm-up).
    """
    if share == INF or share >= 1:
        return share if share == INF else int(share * epoch_length)
    if share <= 0:
        return 0
    return min(max(2, int(share * epoch_length)), max(1, epoch_length // 2))


def _iter_bounds(begin, end, epoch_length):
    assert epoch_length is not None and epoch_length > 0, f"epoch_length must be positive, got {epoch_length}"
    begin, end = iteration_boundary(begin, epoch_length), iteration_boundary(end, epoch_length)
    if end != INF and begin >= end:  # an epoch of one iteration: the phases share it
        begin = end - 1
    return begin, end


class WarmupLinearLR(LinearLR):
    """mmengine's LinearLR; converted from epochs, a positive boundary is at least one iteration."""

    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, by_epoch=True, epoch_length=None, **kwargs):
        assert by_epoch, "only epoch-based settings are converted"
        begin, end = _iter_bounds(begin, end, epoch_length)
        if end - begin < 2:  # too short to ramp (LinearLR's last step is the full rate): no warm-up
            kwargs.update(start_factor=1.0, end_factor=1.0)
        return cls(*args, begin=begin, end=end, by_epoch=False, **kwargs)


class WarmupCosineAnnealingLR(CosineAnnealingLR):
    """mmengine's CosineAnnealingLR; converted from epochs, a positive boundary is at least one iteration."""

    @classmethod
    def build_iter_from_epoch(cls, *args, T_max=None, begin=0, end=INF, by_epoch=True, epoch_length=None,
                              **kwargs):
        assert by_epoch, "only epoch-based settings are converted"
        begin, end = _iter_bounds(begin, end, epoch_length)
        if T_max is not None:
            T_max = T_max * epoch_length
        return cls(*args, T_max=T_max, begin=begin, end=end, by_epoch=False, **kwargs)
