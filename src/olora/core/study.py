"""Pure analysis for the OLoRA-vs-LoRA convergence study (experiments/convergence.py runs the experiments).

Everything here is a function of recorded results: choosing a learning rate, aggregating loss
curves over seeds, the number of steps one method needs to reach another's final validation loss,
and benchmark means with their standard errors. No I/O, so each decision is unit-tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
