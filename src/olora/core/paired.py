"""Paired comparison of two models scored on the same questions: difference, interval, p-values, power.

Pure (numpy and the standard library only, no I/O). A table maps task -> {question key -> score},
with scores 0/1 (lm-eval's per-sample `acc` or `acc_norm`). The compared metric is the one the
pipeline reports and promotes on: the mean over tasks of each task's accuracy, so every task weighs
the same whatever its question count; the interval resamples questions within each task
(a stratified paired bootstrap) and averages the tasks as the metric does.

For 0/1 scores a paired difference takes only the values -1, 0 and 1, so resampling a task's n
differences with replacement is exactly a multinomial draw of how many of each: the bootstrap is
vectorised over resamples and costs O(resamples × tasks), not O(resamples × questions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

Table = dict[str, dict[str, float]]
POWER = 0.8


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


def _check(champion: Table, challenger: Table) -> None:
    if set(champion) != set(challenger):
        raise ValueError(f"the tables cover different tasks: {sorted(champion)} vs {sorted(challenger)}")
    for task in champion:
        a, b = champion[task], challenger[task]
        if set(a) != set(b):
            only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
            raise ValueError(f"task {task}: the tables hold different questions (e.g. only in the first: {only_a}, "
                             f"only in the second: {only_b})")
        if not a:
            raise ValueError(f"task {task} has no questions")
        bad = [v for v in (*a.values(), *b.values()) if v not in (0, 1)]
        if bad:
            raise ValueError(f"task {task}: scores must be 0 or 1 (per-question accuracy), got {bad[0]!r}")


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value: P(X <= min(b, c)) doubled, X ~ Binomial(b + c, 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def _clean(x: float) -> float:
    """A difference of accuracies without float dust: -4.9e-19 is 0 (and never prints as -0.0)."""
    return round(float(x), 12) + 0.0


def _variance(d: np.ndarray, accuracy: float) -> float:
    """Variance of one paired difference; where no question was answered differently (observed variance 0),
    the unpaired bound 2p(1-p), and at least 1/n, so a power statement never claims a perfect instrument."""
    var = float(d.var())
    return var if var > 0 else max(2 * accuracy * (1 - accuracy), 1 / len(d))


def compare(champion: Table, challenger: Table, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> Comparison:
    """Challenger minus champion on the same questions, per task and for the mean over tasks."""
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    if resamples < 1000:
        raise ValueError(f"at least 1000 bootstrap resamples are needed for a stable interval, got {resamples}")
    _check(champion, challenger)
    rng = np.random.default_rng(seed)
    alpha = 1 - confidence
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(POWER)
    values = np.array([-1.0, 0.0, 1.0])
    tasks: dict[str, TaskComparison] = {}
    draws = []
    variances = []
    for task in sorted(champion):
        keys = sorted(champion[task])
        a = np.array([champion[task][k] for k in keys])
        b = np.array([challenger[task][k] for k in keys])
        d = b - a
        n = len(d)
        counts = np.array([(d == v).sum() for v in values])
        means = rng.multinomial(n, counts / n, size=resamples) @ values / n  # the paired bootstrap of this task's mean
        draws.append(means)
        var = _variance(d, float((a.mean() + b.mean()) / 2))
        variances.append(var / n)
        low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        better, worse = int(counts[2]), int(counts[0])
        tasks[task] = TaskComparison(task, n, _clean(d.mean()), _clean(low), _clean(high), mcnemar_exact(better, worse),
                                     better, worse, z * math.sqrt(var / n))
    overall = np.mean(draws, axis=0)  # tasks weigh equally, as in the metric
    low, high = np.quantile(overall, [alpha / 2, 1 - alpha / 2])
    k = len(tasks)
    return Comparison(
        n=sum(t.n for t in tasks.values()),
        diff=_clean(np.mean([t.diff for t in tasks.values()])),
        low=_clean(low),
        high=_clean(high),
        confidence=confidence,
        resamples=resamples,
        mde=z * math.sqrt(sum(variances)) / k,
        tasks=tasks,
    )
