"""Whether a challenger adapter replaces the champion: a pure function of their metrics.

The registry calls that act on the decision live in `olora.registry`; this module touches nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_metric: float
    champion_metric: float | None


def decide(
    challenger: float | None,
    champion: float | None,
    min_improvement: float = 0.0,
    force: bool = False,
    metric: str = "mean_acc",
) -> Decision:
    """Promote when there is no champion, when forced, or when the challenger beats it by the margin.

    Higher is better. A challenger without a finite metric is never promoted unless forced.
    """
    if min_improvement < 0:
        raise ValueError(f"min_improvement must be >= 0, got {min_improvement}")
    have_challenger = challenger is not None and math.isfinite(challenger)
    value = challenger if have_challenger else math.nan
    if force:
        return Decision(True, "forced by --force", value, champion)
    if not have_challenger:
        return Decision(False, f"challenger has no finite {metric}", value, champion)
    if champion is None or not math.isfinite(champion):
        return Decision(True, "no champion yet", value, champion)
    gain = value - champion
    if gain > 0 and gain >= min_improvement - 1e-12:  # tolerate float rounding of the difference
        return Decision(True, f"{metric} {value:.4f} beats champion {champion:.4f} by {gain:+.4f} (>= {min_improvement})", value, champion)
    return Decision(
        False,
        f"{metric} {value:.4f} vs champion {champion:.4f}: gain {gain:+.4f} below the required {min_improvement} (or not positive)",
        value,
        champion,
    )
