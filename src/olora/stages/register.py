"""Stage `register`: the exported adapter becomes a new version in the MLflow Model Registry (alias challenger).

The registry logic (and promotion/rollback, which are commands, not stages) is `olora.tracking.registry`.
"""

from __future__ import annotations

import sys
from typing import Any

from olora.config import load_config
from olora.evaluation.result import EvalResult
from olora.io import write_json
from olora.layout import Layout


def register(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, tracking=None) -> dict[str, Any]:
    """The stage: models/exported + metrics/eval_adapter.json -> a registered version, reports/registration.json."""
    from olora.tracking import registry
    from olora.tracking.client import Tracking

    cfg = load_config(layout.params, overrides)
    if not cfg.tracking.enabled:
        record: dict[str, Any] = {"registered": False, "reason": "tracking.enabled is false"}
    else:
        tracking = tracking or Tracking.of(cfg, layout.root)
        metrics = EvalResult.read(layout.metrics("eval_adapter"))
        reg = registry.register(cfg, tracking, layout.root, layout.adapter, layout.exported, metrics)
        record = {"registered": True, **registry.registration_record(reg, tracking.uri)}
    write_json(layout.registration, record)
    return record


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("register", register, tracked=True, show=True))
