"""The training objective's options beyond POLAR's published ranking loss.

POLAR is fine-tuned with a Bradley-Terry loss, -log sigmoid(s_c - s_r), over
the score s_c of the chosen and s_r of the rejected answer (each scored against
the record's reference). Three options change it, all off by default so the
published recipe is untouched:

* ``margin``: each record may carry a numeric ``margin`` m ("much better"
  gets a larger one). The loss becomes -log sigmoid(s_c - s_r - m), so the
  model must separate such pairs by at least about m. TRL's ``margin`` column,
  OpenRLHF's ``margin_loss_enable``.
* ``center_rewards_coefficient`` c: adds c * mean((s_c + s_r)^2), pulling the
  scores of every pair towards zero mean, so the reward keeps a stable scale
  for RL (TRL's option of the same name; 1e-2 is its recommended value).
* ``loss_in_fp32``: scores are cast to fp32 before the loss. Under bf16 the
  difference of two large scores loses precision, and fp16 overflows.

:class:`LossSettings` holds them; :func:`pair_loss_terms` computes the loss
on one row's scores. ``PolarRewardModel`` uses both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polar_xtuner.errors import ConfigError


@dataclass(frozen=True)
class LossSettings:
    """Options of the reward loss (the config's top-level variables of the same names).

    Attributes:
        margin: Use each record's ``margin`` field (records without one count
            as 0). False ignores the field.
        center_rewards_coefficient: Weight c of c * mean((s_c + s_r)^2); 0 is off.
        loss_in_fp32: Compute the loss on fp32 copies of the scores.
    """

    margin: bool = False
    center_rewards_coefficient: float = 0.0
    loss_in_fp32: bool = False

    def __post_init__(self):
        if not isinstance(self.margin, bool):
            raise ConfigError(f"margin must be True or False (use each record's 'margin' field), "
                              f"got {self.margin!r}")
        c = self.center_rewards_coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ConfigError(f"center_rewards_coefficient must be a finite number >= 0, got {c!r}")
        if not isinstance(self.loss_in_fp32, bool):
            raise ConfigError(f"loss_in_fp32 must be True or False, got {self.loss_in_fp32!r}")


def pair_loss_terms(chosen: torch.Tensor, rejected: torch.Tensor, settings: LossSettings,
                    margins: torch.Tensor | None = None, loss_type: str = "ranking") -> dict[str, torch.Tensor]:
    """The loss of one row's pairs, as a mean over its pairs.

    Args:
        chosen: Scores of the chosen answers, shape (pairs,) or (pairs, 1).
        rejected: Scores of the rejected answers, the same shape.
        settings: The options.
        margins: One margin per pair (used only with ``settings.margin``).
        loss_type: "ranking" (Bradley-Terry) or "focal" (InternLM2's focal
            ranking loss, which down-weights pairs already well separated).

    Returns:
        ``ranking`` (the Bradley-Terry or focal term), ``center`` (the
        centering term, weighted; zero when off) and ``loss``, their sum.
    """
    chosen, rejected = chosen.reshape(-1), rejected.reshape(-1)
    if settings.loss_in_fp32:
        chosen, rejected = chosen.float(), rejected.float()
    diff = chosen - rejected
    if settings.margin and margins is not None:
        diff = diff - margins.reshape(-1).to(diff.dtype)
    per_pair = -F.logsigmoid(diff)
    if loss_type == "focal":
        # p = how surely the pair is ordered (0 at a tie); (1 - p)^2 fades easy pairs.
        p = 2 * torch.relu(torch.sigmoid(diff) - 0.5)
        per_pair = (1 - p) ** 2 * per_pair
    elif loss_type != "ranking":
        raise ConfigError(f"loss_type must be 'ranking' or 'focal', got {loss_type!r}")
    ranking = per_pair.mean()
    if settings.center_rewards_coefficient:
        center = settings.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    else:
        center = torch.zeros((), dtype=ranking.dtype, device=ranking.device)
    return {"ranking": ranking, "center": center, "loss": ranking + center}
