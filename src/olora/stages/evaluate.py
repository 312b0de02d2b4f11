"""Stage `evaluate`: lm-eval on base + exported adapter, compared with the base on the same questions.

The tasks are those `evaluate_base` scored the untouched base on (its own stage and module,
`olora.stages.evaluate_base`): the paper's seven commonsense benchmarks (zero-shot) and the team's
own under `evals/`. The comparison is paired differences with intervals (`olora.core.paired`);
every question's outcome is kept (`eval/adapter_samples.csv`) with a fingerprint of what was asked,
and the scores are added to the adapter's MLflow run. Tasks, running and reports are `olora.evaluation`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from olora.config import Config
from olora.evaluation import samples
from olora.evaluation.harness import load_model_for_eval, run_lm_eval
from olora.evaluation.report import paired_with_base, report_markdown, with_deltas
from olora.evaluation.result import EvalResult
from olora.evaluation.tasks import prepared
from olora.faults import marker
from olora.io import write_text
from olora.layout import EVALS, Layout

log = logging.getLogger("olora")


def evaluate(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, tracking=None) -> EvalResult:
    """The stage `evaluate`: base + exported adapter -> metrics/eval_adapter.json, eval/adapter_samples.csv, reports/eval.md.

    The scores are written before they are logged to the adapter's MLflow run, so a tracking outage
    loses none of them. `tracking` (an `olora.tracking.client.Tracking`) overrides the config's server.
    """
    from olora.io import check_adapter_dir
    from olora.modeling.models import load_tokenizer
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides, preflight)
    check_adapter_dir(layout.exported)  # the adapter and the base's results, checked before the expensive part
    base = EvalResult.read(layout.metrics("eval_base"))
    base_rows = samples.read_samples(layout.samples("base"))
    samples.check_matches(base_rows, base.questions or {}, str(layout.samples("base")))
    with prepared(cfg.evaluate, layout.path(EVALS)) as tasks:  # the tasks (stock and evals/) checked before the model loads
        model = load_model_for_eval(ref, runtime, layout.exported)
        result = run_lm_eval(model, load_tokenizer(ref), cfg.evaluate, tasks=tasks)
    marker("evaluate:scored")
    samples.write_samples(layout.samples("adapter"), result.rows)
    metrics = paired_with_base(with_deltas(result.metrics, base), base, base_rows, result.rows, cfg.register)
    write_text(layout.report, report_markdown(base, metrics, f"{cfg.adapter.init} r={cfg.adapter.r} on {ref.name}"))
    metrics.write(layout.metrics("eval_adapter"))
    if cfg.tracking.enabled:
        _log_to_run(cfg, layout, base, metrics, tracking)
    log.info("evaluate adapter: mean acc %.4f", metrics.mean_acc)
    return metrics


def preflight(cfg: Config, root: Path, present: bool = True) -> None:
    """What this stage refuses before any weights load: the same as `evaluate_base`'s (its own copy, so that
    editing one evaluate stage's module reruns only that stage)."""
    from olora.modeling.runtime import resolve_runtime
    from olora.stages import base_model

    base_model(cfg, root, present)
    resolve_runtime(cfg.model, cfg.runtime)
    with prepared(cfg.evaluate, Path(root) / EVALS):
        pass


def _log_to_run(cfg: Config, layout: Layout, base: EvalResult, tuned: EvalResult, tracking) -> None:
    """Add the scores, the report and the per-question results to the adapter's MLflow run."""
    from olora.tracking import runs
    from olora.tracking.client import Tracking

    if runs.read_run_file(layout.adapter) is None:
        return
    run = runs.reopen(tracking or Tracking.of(cfg, layout.root), layout.adapter)
    runs.log_evaluation(run, base, tuned, layout.report,
                        [layout.samples("base"), layout.samples("adapter"), layout.metrics("eval_adapter")])


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("evaluate", evaluate, tracked=True))
