"""Running lm-eval on a model held in memory (base, or base with an exported adapter merged in) and summarising it."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olora.config import EvaluateConfig
from olora.evaluation import samples
from olora.evaluation.tasks import tasks_for
from olora.modeling import models
from olora.modeling.runtime import Runtime

def summarise(raw: dict[str, Any], names: dict[str, str], split: dict[str, str], limit: int) -> dict[str, Any]:
    """lm-eval's results -> {tasks: {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, split}}, means}."""
    tasks = {}
    for stock, name in names.items():
        row = raw["results"][name]
        entry = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                entry[metric] = float(row[f"{metric},none"])
                stderr = row.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else math.nan
        entry["n"] = int(raw.get("n-samples", {}).get(name, {}).get("effective", 0))
        entry["split"] = split[stock]
        tasks[stock] = entry
    accs = [t["acc"] for t in tasks.values() if "acc" in t]
    norms = [t.get("acc_norm", t["acc"]) for t in tasks.values() if "acc" in t]
    return {
        "tasks": tasks,
        "mean_acc": sum(accs) / len(accs),
        "mean_acc_norm": sum(norms) / len(norms),
        "limit": limit,
    }


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
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


def run_lm_eval(model, tokenizer, cfg: EvaluateConfig) -> Evaluation:
    """Score an in-memory model with lm-eval's simple_evaluate: the summary and every question's outcome."""
    from lm_eval import simple_evaluate

    lm = backend_class(cfg.backend)(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=2048)
    with tempfile.TemporaryDirectory() as folder:
        manager, names, split = tasks_for(cfg.source, cfg.tasks, Path(folder))
        raw = simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            task_manager=manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit or None,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
            log_samples=True,
            bootstrap_iters=1000,
        )
    rows = samples.rows_from_lm_eval(raw, names)
    metrics = summarise(raw, names, split, cfg.limit)
    metrics["questions"] = samples.fingerprint(rows, cfg, {stock: raw["versions"].get(name) for stock, name in names.items()})
    return Evaluation(metrics, rows)


def load_model_for_eval(ref: models.ModelRef, runtime: Runtime, adapter_dir: Path | None):
    """Untouched base, optionally with an exported (plain LoRA) adapter merged in for speed."""
    base = models.load_base(ref, runtime)
    if adapter_dir is None:
        return base
    from olora.io import check_adapter_dir
    from olora.modeling.merge import merged

    check_adapter_dir(adapter_dir)
    return merged(base, adapter_dir)
