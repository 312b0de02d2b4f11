"""Stages `evaluate_base` and `evaluate`: lm-eval on the paper's seven commonsense benchmarks, zero-shot.

`evaluate_base` scores the untouched base (its own stage, so DVC caches it across adapter
experiments); `evaluate` scores base + exported adapter and writes the differences and the report.
Tasks, running and reports are `olora.evaluation`.
"""

from __future__ import annotations

import logging
from typing import Any

from olora.config import Config
from olora.evaluation.harness import load_model_for_eval, run_lm_eval
from olora.evaluation.report import report_markdown, with_deltas
from olora.faults import marker
from olora.io import read_json, write_json, write_text
from olora.layout import Layout

log = logging.getLogger("olora")


def evaluate_base(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage `evaluate_base`: lm-eval on the untouched base -> metrics/eval_base.json."""
    return _evaluate("base", layout, overrides)


def evaluate(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, tracking=None) -> dict[str, Any]:
    """The stage `evaluate`: lm-eval on base + exported adapter -> metrics/eval_adapter.json, reports/eval.md.

    The scores are written before they are logged to the adapter's MLflow run, so a tracking outage
    loses none of them. `tracking` (an `olora.tracking.client.Tracking`) overrides the config's server.
    """
    return _evaluate("adapter", layout, overrides, tracking)


def _evaluate(which: str, layout: Layout, overrides: dict[str, Any] | None, tracking=None) -> dict[str, Any]:
    from olora.modeling.models import load_tokenizer
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides)
    base = read_json(layout.metrics("eval_base")) if which == "adapter" else None  # before the expensive part
    model = load_model_for_eval(ref, runtime, layout.exported if which == "adapter" else None)
    metrics = run_lm_eval(model, load_tokenizer(ref), cfg.evaluate)
    marker("evaluate:scored" if which == "adapter" else "evaluate_base:scored")
    if base is not None:
        metrics = with_deltas(metrics, base)
        write_text(layout.report, report_markdown(base, metrics, f"{cfg.adapter.init} r={cfg.adapter.r} on {ref.name}"))
    write_json(layout.metrics(f"eval_{which}"), metrics)
    if base is not None and cfg.tracking.enabled:
        _log_to_run(cfg, layout, base, metrics, tracking)
    log.info("evaluate %s: mean acc %.4f", which, metrics["mean_acc"])
    return metrics


def _log_to_run(cfg: Config, layout: Layout, base: dict[str, Any], tuned: dict[str, Any], tracking) -> None:
    """Add the scores to the adapter's MLflow run, found through its DVC output."""
    from olora.tracking import runs
    from olora.tracking.client import Tracking

    if runs.read_run_file(layout.adapter) is None:
        return
    run = runs.reopen(tracking or Tracking.of(cfg, layout.root), layout.adapter)
    runs.log_evaluation(run, base, tuned, layout.report)
