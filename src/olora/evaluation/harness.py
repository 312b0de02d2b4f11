"""Running lm-eval on a model held in memory (base, or base with an exported adapter merged in) and summarising it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from olora.config import EvaluateConfig
from olora.evaluation import samples
from olora.evaluation.result import EvalResult, TaskScore, Timing, summary
from olora.evaluation.tasks import PreparedTasks, prepared
from olora.modeling import models
from olora.modeling.runtime import Runtime


def summarise(raw: dict[str, Any], names: dict[str, str], split: dict[str, str], limit: int,
              scoring: dict[str, tuple[str, str]] | None = None) -> EvalResult:
    """lm-eval's results -> the per-task scores (acc, acc_stderr, acc_norm, acc_norm_stderr, n, split) and their means.

    A task's `acc` is its per-question score's mean: accuracy for multiple-choice tasks, exact match for
    generative ones (`scoring`: task -> (metric, filter) for the team's tasks; those scored by exact match
    say so in `scored_by`).
    """
    tasks = {}
    for stock, name in names.items():
        row = raw["results"][name]
        metric, flt = (scoring or {}).get(stock, ("acc", "none"))
        scores: dict[str, float] = {}
        for key, out in ((metric, "acc"), ("acc_norm", "acc_norm")):
            if f"{key},{flt}" in row and (key == metric or metric == "acc"):
                scores[out] = float(row[f"{key},{flt}"])
                stderr = row.get(f"{key}_stderr,{flt}")
                scores[f"{out}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else math.nan
        tasks[stock] = TaskScore(n=int(raw.get("n-samples", {}).get(name, {}).get("effective", 0)), split=split[stock],
                                 scored_by=metric if metric != "acc" else None, **scores)
    return summary(tasks, limit)


@dataclass(frozen=True)
class Evaluation:
    metrics: EvalResult
    """The summary (per task acc, acc_norm, their stderr, n, split; the means) with `questions`, the fingerprint."""
    rows: list[dict[str, Any]]
    """One row a question (`olora.evaluation.samples`)."""


def backend_class(backend: str):
    """The lm-eval model class of `evaluate.backend`: `prefix` (olora-prefix) or lm-eval's own `hf`."""
    if backend == "prefix":
        from olora.evaluation.prefix_lm import PrefixCachedLM

        return PrefixCachedLM
    from lm_eval.models.huggingface import HFLM

    return HFLM


def run_lm_eval(model, tokenizer, cfg: EvaluateConfig, evals: Path | None = None,
                tasks: PreparedTasks | None = None, only: dict[str, list[int]] | None = None) -> Evaluation:
    """Score an in-memory model with lm-eval's simple_evaluate: the summary and every question's outcome.

    `evals`: the folder of the team's own tasks (`<project>/evals`); `tasks`: the tasks already prepared
    and checked (`olora.evaluation.tasks.prepared`, which the stage runs before loading the model).
    `only` (task -> question indices in its split, instead of `cfg.limit`): just those questions, through
    lm-eval's `samples`; each row keeps its question's index in the split as its doc_id, as a limited run does.
    """
    if tasks is None:
        with prepared(cfg, evals) as tasks:
            return run_lm_eval(model, tokenizer, cfg, tasks=tasks, only=only)
    import time

    from lm_eval import simple_evaluate

    lm = backend_class(cfg.backend)(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=2048)
    names = {t: n for t, n in tasks.names.items() if only is None or only.get(t)}
    start = time.monotonic()
    raw = simple_evaluate(
        model=lm,
        tasks=list(names.values()),
        task_manager=tasks.manager,
        num_fewshot=cfg.num_fewshot,
        limit=None if only is not None else cfg.limit or None,
        samples=None if only is None else {names[t]: sorted(only[t]) for t in names},
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        log_samples=True,
        bootstrap_iters=1000,
    )
    seconds = time.monotonic() - start
    rows = samples.rows_from_lm_eval(raw, names, tasks.scoring)
    if only is not None:
        rows = _in_split(rows, only)
    # what `olora eval-plan` times from: lm-eval's requests (one a choice) and the seconds they took, here
    asked = {(name, s["doc_id"]): len(s["arguments"]) for name in names.values() for s in raw["samples"][name]}
    metrics = replace(summarise(raw, names, tasks.split, cfg.limit, tasks.scoring),
                      timing=Timing(sum(asked.values()), round(seconds, 3)),
                      questions=samples.fingerprint(rows, cfg, {stock: raw["versions"].get(name) for stock, name in names.items()},
                                                    tasks.definitions))
    return Evaluation(metrics, rows)


def _in_split(rows: list[dict[str, Any]], only: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Rows of a run on `only`'s questions with each doc_id its question's index in the split: lm-eval 0.4 numbers
    the questions it was given from 0 (a version that keeps their indices is taken as it is)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        wanted = sorted(set(only[task]))
        mine = [r for r in rows if r["task"] == task]
        ids = sorted(r["doc_id"] for r in mine)
        if ids == list(range(len(wanted))):
            out += [{**r, "doc_id": wanted[r["doc_id"]]} for r in mine]
        elif ids == wanted:
            out += mine
        else:
            raise RuntimeError(f"lm-eval returned questions {ids[:5]}... of {task}, not the {len(wanted)} asked for")
    return out


def load_model_for_eval(ref: models.ModelRef, runtime: Runtime, adapter_dir: Path | None):
    """Untouched base, optionally with an exported (plain LoRA) adapter merged in for speed."""
    base = models.load_base(ref, runtime)
    if adapter_dir is None:
        return base
    from olora.io import check_adapter_dir
    from olora.modeling.merge import merged

    check_adapter_dir(adapter_dir)
    return merged(base, adapter_dir)
