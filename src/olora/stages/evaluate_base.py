"""Stage `evaluate_base`: lm-eval on the untouched base -> metrics/eval_base.json, eval/base_samples.csv.

Its own stage (and module, with no MLflow code), so DVC caches it across adapter experiments and
editing the adapter's evaluation or the tracking code reruns it never. The tasks are the paper's
seven commonsense benchmarks (zero-shot) and the team's own under `evals/`; every question's
outcome is kept, with a fingerprint of what was asked. Tasks, running and reports are `olora.evaluation`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from olora.config import Config
from olora.evaluation import samples
from olora.evaluation.harness import load_model_for_eval, run_lm_eval
from olora.evaluation.result import EvalResult
from olora.evaluation.tasks import prepared
from olora.faults import marker
from olora.layout import EVALS, Layout

log = logging.getLogger("olora")


def preflight(cfg: Config, root: Path, present: bool = True) -> None:
    """What this stage refuses before any weights load: the base model, device and quantisation, and
    evaluate.tasks (stock and the team's tasks under evals/, each loaded as lm-eval will)."""
    from olora.modeling.runtime import resolve_runtime
    from olora.stages import base_model

    base_model(cfg, root, present)
    resolve_runtime(cfg.model, cfg.runtime)
    with prepared(cfg.evaluate, Path(root) / EVALS):
        pass


def evaluate_base(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> EvalResult:
    """The stage `evaluate_base`: lm-eval on the untouched base -> metrics/eval_base.json, eval/base_samples.csv."""
    from olora.modeling.models import load_tokenizer
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides, preflight)
    with prepared(cfg.evaluate, layout.path(EVALS)) as tasks:  # the tasks (stock and evals/) checked before the model loads
        model = load_model_for_eval(ref, runtime, None)
        result = run_lm_eval(model, load_tokenizer(ref), cfg.evaluate, tasks=tasks)
    marker("evaluate_base:scored")
    samples.write_samples(layout.samples("base"), result.rows)
    result.metrics.write(layout.metrics("eval_base"))
    log.info("evaluate base: mean acc %.4f", result.metrics.mean_acc)
    return result.metrics


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("evaluate_base", evaluate_base))
