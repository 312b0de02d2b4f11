"""A group-sequential promotion gate: look at nested question sets, ask more questions only when the answer is unclear.

Pure (numpy and the standard library only, no I/O). The gate looks at the paired comparison
(`olora.core.paired`) on nested question sets, e.g. `register.stages: [100, 400, 0]` questions per task
(0: the whole split), both sides scored on each before it is looked at. At look k the interval is
`diff ± b_k · se` (se: the paired standard error of the metric's difference); the challenger is promoted
when its lower bound clears `register.min_improvement`, the champion kept for futility when its upper
bound falls below it, else the next set is scored; the last look decides either way.

The critical values b_k spend the false-promotion rate across looks (Lan & DeMets 1983): O'Brien &
Fleming's type, alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) at information fraction t (strict early, close
to the fixed test at the end), or Pocock's type, alpha ln(1 + (e - 1) t) (more willing to stop early, less
power at the end), computed exactly by numerical integration of the statistic's joint normal
law (Armitage, McPherson & Rowe 1969), or Bonferroni's split (alpha / K at every look; simpler, more
conservative). Futility never raises the false-promotion rate (it only stops), so it is not spent.

The overall false-promotion rate is the fixed gate's: a two-sided interval at `register.confidence` has
its lower bound above a true gain of `min_improvement` with probability (1 - confidence) / 2, and the
sequential gate's chance of promoting at any of its looks under that truth is the same number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

RULES = ("obrien-fleming", "pocock", "bonferroni")
_N = NormalDist()
_GRID = 0.01  # the step of the integration grid, in standard deviations of the statistic's Brownian motion


def false_promotion_rate(confidence: float) -> float:
    """The fixed gate's (one-sided) false-promotion rate at `confidence`, which the sequential gate keeps."""
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    return (1 - confidence) / 2


def information_fractions(sizes: list[dict[str, int]], weights: dict[str, float]) -> list[float]:
    """Each look's share of the last look's statistical information, from the planned questions per task.

    `sizes[k]`: task -> questions at look k; `weights`: task -> weight (summing to 1). The metric's variance is
    sum_t w_t^2 var_t / n_t; with the per-question variance alike across tasks and looks, information (its
    inverse) grows as 1 / sum_t w_t^2 / n_t, so a task whose split ran out stops adding any.
    """
    if not sizes:
        raise ValueError("no looks")
    var = [sum(w * w / s[t] for t, w in weights.items()) for s in sizes]
    out = [var[-1] / v for v in var]
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"the looks' question sets must grow (information fractions {[round(f, 4) for f in out]})")
    return out


def spent(t: float, alpha: float, rule: str = "obrien-fleming") -> float:
    """Cumulative error spent by information fraction t (Lan & DeMets), alpha at t = 1: O'Brien–Fleming type
    2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) (little early), or Pocock type alpha ln(1 + (e - 1) t) (much early)."""
    if rule == "pocock":
        return alpha * math.log(1 + (math.e - 1) * t)
    return 2 - 2 * _N.cdf(_N.inv_cdf(1 - alpha / 2) / math.sqrt(t))


def boundaries(fractions: list[float], alpha: float, rule: str = "obrien-fleming") -> list[float]:
    """One-sided critical values b_k of the standardised statistic at each look, so that under no true gain
    (beyond the margin) the chance of crossing at any look is `alpha`.

    `fractions`: increasing information fractions ending at 1. O'Brien–Fleming or Pocock: the error spent between
    looks follows `spent`, solved look by look on a grid of the statistic's density among the runs not yet stopped.
    Bonferroni: z_{1-alpha/K} at every look.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    t = [float(f) for f in fractions]
    if not t or abs(t[-1] - 1) > 1e-9 or t[0] <= 0 or any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError(f"information fractions must increase from above 0 to 1, got {fractions}")
    if rule == "bonferroni":
        return [_N.inv_cdf(1 - alpha / len(t))] * len(t)
    # B(t) = Z(t) sqrt(t) is standard Brownian motion under the null: track its density below the boundary
    x = np.arange(-12.0, 12.0 + _GRID / 2, _GRID)
    out: list[float] = []
    density = None
    previous = 0.0
    for k, tk in enumerate(t):
        step = spent(tk, alpha, rule) - previous
        previous = spent(tk, alpha, rule)
        if density is None:
            b = _N.inv_cdf(1 - step) if step > 1e-15 else 12.0
            density = np.exp(-x * x / (2 * tk)) / math.sqrt(2 * math.pi * tk)
        else:
            dt = tk - t[k - 1]
            mass = density * _GRID

            def crossing(c: float) -> float:
                return float(mass @ _tail((c - x) / math.sqrt(dt)))

            lo, hi = -8.0 * math.sqrt(tk), 12.0 * math.sqrt(tk)
            if crossing(hi) >= step:
                c = hi
            else:
                for _ in range(80):  # bisection: crossing() falls as c rises
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if crossing(mid) > step else (lo, mid)
                c = (lo + hi) / 2
            b = c / math.sqrt(tk)
            kernel = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * dt)) / math.sqrt(2 * math.pi * dt)
            density = kernel @ mass
        density = np.where(x < b * math.sqrt(tk), density, 0.0)
        out.append(min(b, 12.0))
    return out


def _tail(z: np.ndarray) -> np.ndarray:
    """1 - Phi(z), elementwise."""
    return 0.5 * np.vectorize(math.erfc)(z / math.sqrt(2))


def level(b: float) -> float:
    """The two-sided confidence of the interval diff ± b·se (what a look reports as its adjusted level)."""
    return 1 - 2 * (1 - _N.cdf(b))


@dataclass(frozen=True)
class Look:
    n: int
    """Questions compared at this look (per side)."""
    diff: float
    low: float
    high: float
    """The interval diff ± b·se at this look's adjusted level."""
    level: float
    """The interval's two-sided confidence after spending (e.g. 0.9997 at an early O'Brien–Fleming look)."""
    boundary: float
    outcome: str
    """promote | futile (the upper bound is below the margin: keep the champion) | continue."""
    seconds: float = 0.0
    """Scoring time spent to reach this look (both sides)."""

    def to_dict(self) -> dict:
        return asdict(self)


def look(diff: float, se: float, boundary: float, margin: float, n: int, last: bool, seconds: float = 0.0) -> Look:
    """One look: promote when diff - b·se > margin, futile when diff + b·se < margin; at the last look anything
    short of promotion keeps the champion."""
    low, high = diff - boundary * se, diff + boundary * se
    outcome = "promote" if low > margin else "futile" if high < margin else "keep" if last else "continue"
    return Look(n, diff, low, high, level(boundary), boundary, outcome, seconds)


def decide_arrays(diff: np.ndarray, se: np.ndarray, bounds: list[float], margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised sequential decisions: diff and se of shape (runs, looks) -> (promoted, index of the look that
    stopped each run)."""
    z = (diff - margin) / se
    up = z > np.asarray(bounds)
    down = z < -np.asarray(bounds)
    stop = up | down
    stop[:, -1] = True
    first = stop.argmax(axis=1)
    return up[np.arange(len(z)), first], first


@dataclass(frozen=True)
class Simulation:
    runs: int
    true_gain: float
    promoted_sequential: float
    """Share of the runs the sequential gate promoted."""
    promoted_fixed: float
    """Share the fixed gate at the largest question set promoted."""
    questions_sequential: float
    """Expected questions per side the sequential gate scored (the set of the look it stopped at)."""
    questions_fixed: int
    stopped_at: list[float]
    """Share of the runs that stopped at each look."""


def simulate(sizes: list[dict[str, int]], weights: dict[str, float], true_gain: float, discordant: float = 0.2,
             confidence: float = 0.95, margin: float = 0.0, rule: str = "obrien-fleming", runs: int = 10_000,
             seed: int = 0) -> Simulation:
    """Sequential and fixed gates on `runs` simulated paired comparisons (a fixed seed: the same numbers each time).

    Each question's paired difference is +1, -1 or 0 with P(+1) - P(-1) = `true_gain` and P(+1) + P(-1) =
    `discordant` (how often the two models answer differently), independently; the looks are nested (look k's
    questions are the first sizes[k][t] of each task). Both gates use the same statistic as the real gate:
    the weighted mean of task means and its paired standard error.
    """
    alpha = false_promotion_rate(confidence)
    bounds = boundaries(information_fractions(sizes, weights), alpha, rule)
    diff, se = simulated_statistics(sizes, weights, true_gain, discordant, runs, seed)
    promoted, stopped = decide_arrays(diff, se, bounds, margin)
    fixed = (diff[:, -1] - margin) / se[:, -1] > _N.inv_cdf(1 - alpha)
    per_look = [sum(s.values()) for s in sizes]
    return Simulation(runs, true_gain, float(promoted.mean()), float(fixed.mean()),
                      float(np.mean(np.asarray(per_look)[stopped])), per_look[-1],
                      [float((stopped == k).mean()) for k in range(len(sizes))])


def simulated_statistics(sizes: list[dict[str, int]], weights: dict[str, float], true_gain: float,
                         discordant: float = 0.2, runs: int = 10_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The metric's paired difference and its standard error at each look, shape (runs, looks), for `simulate`."""
    if not 0 < discordant <= 1 or abs(true_gain) > discordant:
        raise ValueError(f"need 0 < discordant <= 1 and |true_gain| <= discordant, got {discordant}, {true_gain}")
    rng = np.random.default_rng(seed)
    p = np.array([(discordant + true_gain) / 2, (discordant - true_gain) / 2, 1 - discordant])
    diff = np.zeros((runs, len(sizes)))
    var = np.zeros((runs, len(sizes)))
    for task in sorted(weights):
        counts = np.zeros((runs, 3))
        done = 0
        for k, s in enumerate(sizes):
            if s[task] > done:  # the next look's questions extend this one's (nested sets)
                counts = counts + rng.multinomial(s[task] - done, p, size=runs)
                done = s[task]
            n = s[task]
            mean = (counts[:, 0] - counts[:, 1]) / n
            v = np.maximum((counts[:, 0] + counts[:, 1]) / n - mean ** 2, 1 / n)
            diff[:, k] += weights[task] * mean
            var[:, k] += weights[task] ** 2 * v / n
    return diff, np.sqrt(var)


def planned_sizes(stages: list[int], splits: dict[str, int]) -> list[dict[str, int]]:
    """register.stages (questions per task, 0: the whole split) -> task -> questions at each look, capped by the
    split sizes; a look that adds no question to any task is dropped."""
    out: list[dict[str, int]] = []
    for stage in stages:
        s = {t: (n if stage == 0 else min(stage, n)) for t, n in splits.items()}
        if not out or any(s[t] > out[-1][t] for t in s):
            out.append(s)
    return out
