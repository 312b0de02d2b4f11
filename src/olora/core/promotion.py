"""Whether a challenger adapter replaces the champion: a pure function of their paired comparison.

The challenger is promoted only when the lower bound of the interval of its gain (challenger minus
champion on the same questions, `olora.core.paired.compare`) exceeds `register.min_improvement`:
a gain that the evaluation's noise could explain never promotes. The registry calls that act on
the decision live in `olora.tracking.registry`; this module touches nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from olora.core.paired import Comparison


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_metric: float
    champion_metric: float | None
    comparison: Comparison | None = None
    forced: bool = False


def decide(
    challenger: float | None,
    champion: float | None,
    comparison: Comparison | None,
    min_improvement: float = 0.0,
    force: bool = False,
    metric: str = "mean_acc",
    compared_on: str | None = None,
) -> Decision:
    """Promote when there is no champion, when forced, or when the gain's interval lies above the margin.

    `challenger`/`champion` are the two versions' `metric` values (reported, not compared);
    `comparison` is challenger minus champion on the same questions (None: no champion). Higher is
    better. A challenger without a finite metric is never promoted unless forced. `compared_on` names the
    question set compared (e.g. `700 questions of 7 tasks; v1 re-scored on 660`), said in the reason.
    """
    if min_improvement < 0:
        raise ValueError(f"min_improvement must be >= 0, got {min_improvement}")
    have_challenger = challenger is not None and math.isfinite(challenger)
    value = challenger if have_challenger else math.nan
    on = f" on {compared_on}" if compared_on else ""
    evidence = f": {comparison.summary()}{on}" if comparison is not None else ""
    if force:
        return Decision(True, "forced by --force" + evidence, value, champion, comparison, forced=True)
    if not have_challenger:
        return Decision(False, f"challenger has no finite {metric}", value, champion, comparison)
    if champion is None:
        return Decision(True, "no champion yet", value, champion, comparison)
    if comparison is None:
        return Decision(False, "no paired comparison with the champion on the same questions", value, champion)
    pct = f"{comparison.confidence * 100:g} %"
    if comparison.low > min_improvement:
        return Decision(True, f"{metric} {comparison.summary()}{on}: the {pct} interval lies above "
                              f"register.min_improvement={min_improvement}", value, champion, comparison)
    why = ("not significant: the interval includes 0" if comparison.low <= 0 <= comparison.high else
           "worse than the champion" if comparison.high < 0 else
           f"the interval's lower bound {comparison.low * 100:+.1f} points does not exceed "
           f"register.min_improvement={min_improvement}")
    return Decision(False, f"{metric} {comparison.summary()}{on}; {why}", value, champion, comparison)
