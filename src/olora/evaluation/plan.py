"""`olora eval-plan`: how many questions a paired comparison needs to detect a target difference, and their cost.

Reads the base model's per-question results (and the fine-tuned model's, when they answer the same
questions: their observed paired variances; else the bound for independent answers, 2p(1-p), which
overstates what a paired comparison needs), the split sizes, and the request rate the evaluate_base stage
measured, and prints per metric (mean_acc: every task weighing the same; pooled_acc: every question) the
questions per task needed (`olora.core.paired.plan`), whether the splits hold them, and the expected time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from olora.config import Config
from olora.errors import OloraError
from olora.evaluation import samples
from olora.layout import EVALS, Layout


def _variances(base: list[dict[str, Any]], tuned: list[dict[str, Any]] | None) -> tuple[dict[str, float], str]:
    a = samples.table(base)
    if tuned is not None:
        b = samples.table(tuned)
        if set(a) == set(b) and all(set(a[t]) == set(b[t]) for t in a):
            out = {}
            for t in a:
                d = np.array([b[t][k] - a[t][k] for k in sorted(a[t])])
                p = np.mean(list(a[t].values()))
                out[t] = float(d.var()) if d.var() > 0 else max(2 * p * (1 - p), 1 / len(d))
            return out, "the paired differences of the fine-tuned model and the base on the same questions"
    out = {t: max(2 * float(np.mean(list(q.values()))) * (1 - float(np.mean(list(q.values())))), 1 / len(q))
           for t, q in a.items()}
    return out, "the bound for independent answers, 2p(1-p) of the base's accuracy (no fine-tuned results on the same questions)"


def eval_plan(cfg: Config, layout: Layout, mde_points: float) -> str:
    """The plan in words (OloraError: a target <= 0, or no per-question results of the base model)."""
    from olora.core.paired import plan
    from olora.evaluation.result import EvalResult
    from olora.evaluation.tasks import split_sizes

    if not (mde_points > 0 and np.isfinite(mde_points)):
        raise OloraError(f"--mde {mde_points} is not a difference that can be detected; give a number of accuracy points "
                         "> 0, e.g. --mde 1.5")
    if not layout.samples("base").is_file():
        raise OloraError(f"no per-question results of the base model ({layout.samples('base')}); the plan is computed "
                         "from them: run `dvc repro evaluate_base` first")
    base = samples.read_samples(layout.samples("base"))
    tuned = samples.read_samples(layout.samples("adapter")) if layout.samples("adapter").is_file() else None
    variances, source = _variances(base, tuned)
    splits = split_sizes(replace(cfg.evaluate, tasks=sorted(variances)), layout.path(EVALS))
    timing = EvalResult.read(layout.metrics("eval_base")).timing if layout.metrics("eval_base").is_file() else None
    rate = timing.requests / timing.seconds if timing is not None and timing.seconds else None
    per_question = {t: np.mean([len(r["loglik"]) for r in base if r["task"] == t and r["loglik"]]) for t in variances}
    lines = [f"eval-plan: questions for a paired comparison to detect {mde_points:g} accuracy points 80 % of the time "
             f"at {cfg.register.confidence * 100:g} % confidence; per-question variance from {source}"]
    for pooled in (False, True):
        p = plan(variances, splits, mde_points / 100, cfg.register.confidence, pooled)
        name = "pooled_acc (every question weighing the same)" if pooled else "mean_acc (every task weighing the same)"
        if p.per_task is None:
            lines.append(f"{name}: not reachable: the whole splits ({p.questions} questions) give an MDE of "
                         f"{p.whole * 100:.2f} points")
            n = max(splits.values())
        else:
            n = p.per_task
            short = {t: s for t, s in splits.items() if s < n}
            holds = ("the splits hold that many for every task" if not short else
                     f"the splits hold that many for {len(splits) - len(short)} of {len(splits)} tasks ("
                     + ", ".join(f"{t} {s}" for t, s in sorted(short.items())) + ": all of theirs)")
            lines.append(f"{name}: {n} questions per task (evaluate.limit: {n}); {holds}; {p.questions} questions per "
                         f"model, MDE {p.reached * 100:.2f} points (whole splits: {p.whole * 100:.2f})")
        requests = sum(min(n, s) * (per_question[t] if np.isfinite(per_question[t]) else 1) for t, s in splits.items())
        lines.append(f"  about {requests:.0f} requests per model; " + (
            f"about {requests / rate:.0f} s per model at the {rate:.1f} requests/s evaluate_base measured here"
            if rate else "time unknown: no request rate measured (run `dvc repro evaluate_base` with this version)"))
    return "\n".join(lines)
