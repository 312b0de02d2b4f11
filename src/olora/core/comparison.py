"""The result of a paired comparison (`olora.core.paired.compare`): per task and for the metric over tasks.

Its own module (plain dataclasses, no numpy) because it is also a file format: the evaluation result carries one
(`vs_base`), so the evaluate stages depend on this definition, not on the bootstrap that computes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TaskComparison:
    task: str
    n: int
    """Questions both models answered."""
    diff: float
    """Mean of challenger minus champion (accuracy points as a fraction)."""
    low: float
    high: float
    """Paired bootstrap interval of `diff` at the comparison's confidence."""
    p_value: float
    """Exact McNemar test (two-sided) on the discordant pairs."""
    better: int
    """Questions only the challenger got right."""
    worse: int
    """Questions only the champion got right."""
    mde: float
    """Minimum detectable effect: the smallest true difference this n finds 80 % of the time."""


@dataclass(frozen=True)
class Comparison:
    n: int
    diff: float
    low: float
    high: float
    confidence: float
    resamples: int
    mde: float
    tasks: dict[str, TaskComparison]
    """Every task of the tables, whether the metric weighs it or not."""
    weights: dict[str, float] | None = None
    """The metric's task weights, summing to 1 (None: every task weighs the same)."""
    champion_score: float | None = None
    challenger_score: float | None = None
    """The compared metric's value for each side (the weighted mean of task accuracies)."""
    se: float | None = None
    """Standard error of `diff` (from the paired per-task variances; what the sequential gate's looks use)."""

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["significant"] = self.significant
        return out

    def summary(self, what: str = "gain") -> str:
        """One line: `gain +5.1 points, 95 % interval [+1.2, +9.0], n = 350 (MDE 4.3 points)`."""
        pct = f"{self.confidence * 100:g} %"
        return (f"{what} {self.diff * 100:+.1f} points, {pct} interval [{self.low * 100:+.1f}, {self.high * 100:+.1f}], "
                f"n = {self.n} (minimum detectable effect {self.mde * 100:.1f} points)")
