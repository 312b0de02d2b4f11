"""Pure analysis for method comparisons (`olora compare`, olora.orchestration.compare, runs them).

Everything here is a function of recorded results: choosing a learning rate, aggregating loss
curves over seeds with a t band, the number of steps each method needs to reach a target loss
with an interval over seeds, Holm's correction over the pairs of methods, and benchmark means
with their standard errors. No I/O, so each decision is unit-tested.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

Curve = Sequence[tuple[int, float]]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd / sqrt(n)); se is nan for one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_se of no values")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pick_learning_rate(final_losses: dict[float, float]) -> float:
    """The learning rate with the lowest final validation loss (non-finite losses never win; ties: smaller lr)."""
    finite = {lr: loss for lr, loss in final_losses.items() if math.isfinite(loss)}
    if not finite:
        raise ValueError(f"no learning rate gave a finite validation loss: {final_losses}")
    return min(sorted(finite), key=lambda lr: finite[lr])


def grid_extension(grid: Sequence[float], best: float, factor: float = 3.0) -> float | None:
    """The next learning rate to try when the best one sits on an edge of the grid, else None."""
    grid = sorted(grid)
    if len(grid) < 2:
        return None
    if best == grid[0]:
        return grid[0] / factor
    if best == grid[-1]:
        return grid[-1] * factor
    return None


def aggregate_curves(curves: Sequence[Curve]) -> list[tuple[int, float, float]]:
    """(step, mean, se) over seeds at the steps every curve has."""
    if not curves:
        return []
    common = set.intersection(*({int(s) for s, _ in c} for c in curves))
    out = []
    for step in sorted(common):
        values = [v for c in curves for s, v in c if int(s) == step]
        out.append((step, *mean_se(values)))
    return out


def steps_to_reach(curve: Curve, target: float) -> int | None:
    """First evaluated step whose validation loss is at or below `target`; None if never reached."""
    for step, value in sorted(curve):
        if value <= target:
            return int(step)
    return None


def benchmark_summary(per_seed: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per task: mean accuracy over seeds, its seed-to-seed standard error, and lm-eval's sampling stderr.

    `per_seed` holds metrics/eval_adapter.json dicts ({"tasks": {task: {"acc": .., "acc_stderr": ..}}}).
    The same questions are scored for every seed, so seed averaging does not shrink lm-eval's
    question-sampling error; both are reported.
    """
    tasks = sorted(set.intersection(*(set(s["tasks"]) for s in per_seed))) if per_seed else []
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        accs = [s["tasks"][task]["acc"] for s in per_seed]
        stderrs = [s["tasks"][task].get("acc_stderr", math.nan) for s in per_seed]
        mean, se = mean_se(accs)
        out[task] = {"acc": mean, "seed_se": se, "sampling_se": sum(stderrs) / len(stderrs)}
    if tasks:
        means = [sum(s["tasks"][t]["acc"] for t in tasks) / len(tasks) for s in per_seed]
        mean, se = mean_se(means)
        sampling = math.sqrt(sum(out[t]["sampling_se"] ** 2 for t in tasks)) / len(tasks)
        out["mean"] = {"acc": mean, "seed_se": se, "sampling_se": sampling}
    return out


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its Student-t interval over `values` (e.g. one number per seed); the bounds are nan for one value."""
    from scipy.stats import t

    mean, se = mean_se(values)
    if math.isnan(se):
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * se
    return mean, mean - half, mean + half


def band(curves: Sequence[Curve], confidence: float = 0.95) -> list[tuple[int, float, float, float]]:
    """(step, mean, low, high) over seeds at the steps every curve has: the t interval of the mean at each step."""
    if not curves:
        return []
    common = set.intersection(*({int(s) for s, _ in c} for c in curves))
    return [(step, *t_interval([v for c in curves for s, v in c if int(s) == step], confidence)) for step in sorted(common)]


def final_value(curve: Curve) -> float:
    """The value at a curve's last step."""
    if not curve:
        raise ValueError("final_value of an empty curve")
    return float(max(curve, key=lambda p: int(p[0]))[1])


def steps_to_target(curves: Mapping[str, Sequence[Curve]], confidence: float = 0.95) -> tuple[float, dict[str, dict]]:
    """Steps each method needs to reach the slowest method's final mean validation loss, over seeds.

    `curves` maps a method to its curves (one per seed). The target is the highest of the methods'
    mean final losses, so every method reaches it on average (the slowest at its last step or
    before). Per method: the steps of each seed (None where a seed never reached it), and their mean
    with its t interval. A seed that never reached the target counts at its last step and the result is
    `censored` (the mean is then a lower bound: that method needs at least that many steps); with two
    seeds the slowest method has one such seed whenever its seeds differ.
    """
    if not curves or any(not c for c in curves.values()):
        raise ValueError("steps_to_target needs at least one curve for every method")
    target = max(sum(final_value(c) for c in cs) / len(cs) for cs in curves.values())
    out: dict[str, dict] = {}
    for method, cs in curves.items():
        steps = [steps_to_reach(c, target) for c in cs]
        counted = [float(s if s is not None else max(int(p[0]) for p in c)) for s, c in zip(steps, cs)]
        mean, low, high = t_interval(counted, confidence)
        reached = sum(s is not None for s in steps)
        out[method] = {"steps": steps, "reached": reached, "seeds": len(steps), "censored": reached < len(steps),
                       "mean": mean, "low": low, "high": high}
    return target, out


def method_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of methods, in the order given (a, b) meaning b minus a."""
    return list(itertools.combinations(methods, 2))


def holm(p_values: Mapping[object, float], alpha: float = 0.05) -> dict[object, dict[str, float]]:
    """Holm's step-down correction over a family of comparisons.

    Per key: the adjusted p-value (reject at `alpha` when it is <= alpha), and the confidence level
    of its interval: the comparison with the i-th smallest p-value (i from 0) is judged at
    alpha / (m - i), so the first at Bonferroni's level and the last at alpha itself.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    order = sorted(p_values, key=lambda k: (p_values[k], str(k)))
    m = len(order)
    out: dict[object, dict[str, float]] = {}
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(p_values[key])))
        out[key] = {"p": float(p_values[key]), "p_holm": running, "confidence": 1 - alpha / (m - i)}
    return out


def stack_seeds(tables: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per-question tables of several seeds as one table (task -> {"s<seed>:<question>": score}): the same
    question under each seed is one pair of the paired comparison of two methods at that seed."""
    out: dict[str, dict[str, float]] = {}
    for seed, table in sorted(tables.items()):
        for task, rows in table.items():
            out.setdefault(task, {}).update({f"s{seed}:{q}": v for q, v in rows.items()})
    return out


def pruner_minimum_trials(startup_trials: int) -> int:
    """The fewest trials in which a median pruner can stop one: `startup_trials` finished trials to compare with,
    then one more that it may prune."""
    return startup_trials + 1
