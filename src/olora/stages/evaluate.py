"""Stages `evaluate_base` and `evaluate`: lm-eval on the paper's seven commonsense benchmarks (zero-shot) and
the team's own tasks under `evals/`.

`evaluate_base` scores the untouched base (its own stage, so DVC caches it across adapter
experiments); `evaluate` scores base + exported adapter and compares the two on the same questions
(paired differences with intervals, `olora.core.paired`). Both keep every question's outcome
(`eval/*_samples.csv`) and a fingerprint of what was asked. Tasks, running and reports are
`olora.evaluation`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from olora.config import Config
from olora.evaluation import samples
from olora.evaluation.harness import load_model_for_eval, run_lm_eval
from olora.evaluation.report import paired_with_base, report_markdown, with_deltas
from olora.evaluation.tasks import prepared
from olora.faults import marker
from olora.io import read_json, write_json, write_text
from olora.layout import EVALS, Layout

log = logging.getLogger("olora")


def evaluate_base(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage `evaluate_base`: lm-eval on the untouched base -> metrics/eval_base.json, eval/base_samples.csv."""
    return _evaluate("base", layout, overrides)


def evaluate(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, tracking=None) -> dict[str, Any]:
    """The stage `evaluate`: base + exported adapter -> metrics/eval_adapter.json, eval/adapter_samples.csv, reports/eval.md.

    The scores are written before they are logged to the adapter's MLflow run, so a tracking outage
    loses none of them. `tracking` (an `olora.tracking.client.Tracking`) overrides the config's server.
    """
    return _evaluate("adapter", layout, overrides, tracking)


def preflight(cfg: Config, root: Path, present: bool = True) -> None:
    """What evaluate_base and evaluate refuse before any weights load: the base model, device and quantisation,
    and evaluate.tasks (stock and the team's tasks under evals/, each loaded as lm-eval will)."""
    from olora.modeling.runtime import resolve_runtime
    from olora.stages import base_model

    base_model(cfg, root, present)
    resolve_runtime(cfg.model, cfg.runtime)
    with prepared(cfg.evaluate, Path(root) / EVALS):
        pass


def _evaluate(which: str, layout: Layout, overrides: dict[str, Any] | None, tracking=None) -> dict[str, Any]:
    from olora.modeling.models import load_tokenizer
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides, preflight)
    base = base_rows = None
    if which == "adapter":  # the adapter and the base's results, checked before the expensive part
        from olora.io import check_adapter_dir

        check_adapter_dir(layout.exported)
        base = read_json(layout.metrics("eval_base"))
        base_rows = samples.read_samples(layout.samples("base"))
        samples.check_matches(base_rows, base.get("questions", {}), str(layout.samples("base")))
    with prepared(cfg.evaluate, layout.path(EVALS)) as tasks:  # the tasks (stock and evals/) checked before the model loads
        model = load_model_for_eval(ref, runtime, layout.exported if which == "adapter" else None)
        result = run_lm_eval(model, load_tokenizer(ref), cfg.evaluate, tasks=tasks)
    marker("evaluate:scored" if which == "adapter" else "evaluate_base:scored")
    metrics = result.metrics
    samples.write_samples(layout.samples(which), result.rows)
    if base is not None:
        metrics = paired_with_base(with_deltas(metrics, base), base, base_rows, result.rows, cfg.register)
        write_text(layout.report, report_markdown(base, metrics, f"{cfg.adapter.init} r={cfg.adapter.r} on {ref.name}"))
    write_json(layout.metrics(f"eval_{which}"), metrics)
    if base is not None and cfg.tracking.enabled:
        _log_to_run(cfg, layout, base, metrics, tracking)
    log.info("evaluate %s: mean acc %.4f", which, metrics["mean_acc"])
    return metrics


def _log_to_run(cfg: Config, layout: Layout, base: dict[str, Any], tuned: dict[str, Any], tracking) -> None:
    """Add the scores, the report and the per-question results to the adapter's MLflow run."""
    from olora.tracking import runs
    from olora.tracking.client import Tracking

    if runs.read_run_file(layout.adapter) is None:
        return
    run = runs.reopen(tracking or Tracking.of(cfg, layout.root), layout.adapter)
    runs.log_evaluation(run, base, tuned, layout.report,
                        [layout.samples("base"), layout.samples("adapter"), layout.metrics("eval_adapter")])
