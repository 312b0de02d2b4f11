"""Paired comparison of two models scored on the same questions: difference, interval, p-values, power.

Pure (numpy and the standard library only, no I/O). A table maps task -> {question key -> score},
with scores 0/1 (lm-eval's per-sample `acc` or `acc_norm`; exact match for a generative task). The
compared metric is the one the pipeline reports and promotes on: the mean over tasks of each task's
accuracy, so every task weighs the same whatever its question count, or a weighted mean of some
tasks (`register.promote_metric`, e.g. `arc_easy:1+copa_example:2`); the interval resamples
questions within each task (a stratified paired bootstrap) and combines the tasks with the metric's
weights.

For 0/1 scores a paired difference takes only the values -1, 0 and 1, so resampling a task's n
differences with replacement is exactly a multinomial draw of how many of each: the bootstrap is
vectorised over resamples and costs O(resamples × tasks), not O(resamples × questions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from olora.core.comparison import Comparison, TaskComparison

Table = dict[str, dict[str, float]]
POWER = 0.8


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


def normalised(weights: dict[str, float] | None, tasks) -> dict[str, float]:
    """Task weights summing to 1 over `tasks` (None: equal weights); a ValueError for a task the tables lack."""
    tasks = sorted(tasks)
    if weights is None:
        return {t: 1 / len(tasks) for t in tasks}
    missing = sorted(set(weights) - set(tasks))
    if missing:
        raise ValueError(f"the metric weighs task(s) {missing} that the results do not hold (they hold {tasks})")
    bad = {t: w for t, w in weights.items() if not (w > 0 and math.isfinite(w))}
    if bad or not weights:
        raise ValueError(f"task weights must be finite numbers > 0, got {bad or weights}")
    total = sum(weights.values())
    return {t: weights[t] / total for t in sorted(weights)}


def score(table: Table, weights: dict[str, float] | None = None) -> float:
    """The metric of one side: the mean over tasks (or the weighted mean) of each task's mean score."""
    w = normalised(weights, table)
    return _clean(sum(w[t] * float(np.mean(list(table[t].values()))) for t in w))


def compare(champion: Table, challenger: Table, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0, weights: dict[str, float] | None = None) -> Comparison:
    """Challenger minus champion on the same questions, per task and for the metric over tasks.

    `weights` (task -> weight > 0) makes the metric a weighted mean of those tasks' accuracies: its
    difference, interval (strata combined with the same weights) and minimum detectable effect follow;
    tasks it leaves out still get their own comparison. None: every task weighs the same.
    """
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    if resamples < 1000:
        raise ValueError(f"at least 1000 bootstrap resamples are needed for a stable interval, got {resamples}")
    _check(champion, challenger)
    w = normalised(weights, champion)
    rng = np.random.default_rng(seed)
    alpha = 1 - confidence
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(POWER)
    values = np.array([-1.0, 0.0, 1.0])
    tasks: dict[str, TaskComparison] = {}
    draws: dict[str, np.ndarray] = {}
    variances: dict[str, float] = {}
    for task in sorted(champion):
        keys = sorted(champion[task])
        a = np.array([champion[task][k] for k in keys])
        b = np.array([challenger[task][k] for k in keys])
        d = b - a
        n = len(d)
        counts = np.array([(d == v).sum() for v in values])
        means = rng.multinomial(n, counts / n, size=resamples) @ values / n  # the paired bootstrap of this task's mean
        draws[task] = means
        var = _variance(d, float((a.mean() + b.mean()) / 2))
        variances[task] = var / n
        low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        better, worse = int(counts[2]), int(counts[0])
        tasks[task] = TaskComparison(task, n, _clean(d.mean()), _clean(low), _clean(high), mcnemar_exact(better, worse),
                                     better, worse, z * math.sqrt(var / n))
    if weights is None:  # tasks weigh equally, as in the metric (kept apart: the same floats as before weights)
        overall = np.mean(list(draws.values()), axis=0)
        diff = np.mean([t.diff for t in tasks.values()])
        se = math.sqrt(sum(variances.values())) / len(tasks)
    else:
        overall = sum(w[t] * draws[t] for t in w)
        diff = sum(w[t] * tasks[t].diff for t in w)
        se = math.sqrt(sum(w[t] ** 2 * variances[t] for t in w))
    low, high = np.quantile(overall, [alpha / 2, 1 - alpha / 2])
    return Comparison(
        n=sum(tasks[t].n for t in w),
        diff=_clean(diff),
        low=_clean(low),
        high=_clean(high),
        confidence=confidence,
        resamples=resamples,
        mde=z * se,
        tasks=tasks,
        weights=None if weights is None else w,
        champion_score=score(champion, weights),
        challenger_score=score(challenger, weights),
        se=se,
    )


@dataclass(frozen=True)
class Plan:
    metric: str
    """mean_acc (every task weighing the same) or pooled_acc (every question weighing the same)."""
    mde: float
    """The target minimum detectable effect (accuracy as a fraction)."""
    per_task: int | None
    """Questions per task needed (a task whose split is smaller gives all it has); None: the whole splits fall short."""
    reached: float
    """The MDE at `per_task` questions a task (or at the whole splits when they fall short)."""
    whole: float
    """The MDE on the whole splits."""
    questions: int
    """Questions per model at `per_task` (or the whole splits)."""


def plan(variances: dict[str, float], splits: dict[str, int], mde: float, confidence: float = 0.95,
         pooled: bool = False) -> Plan:
    """Questions per task for a paired comparison to detect `mde` 80 % of the time at `confidence`.

    `variances`: task -> the variance of one question's paired difference (observed, or a bound);
    `splits`: task -> questions its split holds. With n a task (capped by the split), the metric's standard
    error is sqrt(sum_t w_t^2 var_t / n_t) with w_t = 1/T (mean_acc) or n_t / sum n (pooled_acc); the smallest n
    whose MDE is at most `mde` is found by bisection (the MDE falls as n grows).
    """
    if not (mde > 0 and math.isfinite(mde)):
        raise ValueError(f"the target minimum detectable effect must be a number > 0, got {mde}")
    if set(variances) != set(splits) or not splits:
        raise ValueError(f"variances and split sizes must cover the same tasks: {sorted(variances)} vs {sorted(splits)}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2) + NormalDist().inv_cdf(POWER)

    def at(n: int) -> tuple[float, int]:
        sizes = {t: min(n, splits[t]) for t in splits}
        total = sum(sizes.values())
        if pooled:
            var = sum(sizes[t] * variances[t] for t in sizes) / total ** 2
        else:
            var = sum(variances[t] / sizes[t] for t in sizes) / len(sizes) ** 2
        return z * math.sqrt(var), total

    top = max(splits.values())
    whole, everything = at(top)
    if whole > mde:
        return Plan("pooled_acc" if pooled else "mean_acc", mde, None, whole, whole, everything)
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid)[0] <= mde else (mid + 1, hi)
    reached, questions = at(lo)
    return Plan("pooled_acc" if pooled else "mean_acc", mde, lo, reached, whole, questions)
