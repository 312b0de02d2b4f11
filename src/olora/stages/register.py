"""Stage `register`: the exported adapter becomes a new version in the MLflow Model Registry (alias challenger).

The registry logic (and promotion/rollback, which are commands, not stages) is `olora.tracking.registry`.
"""

from __future__ import annotations

from typing import Any

from olora.config import load_config
from olora.io import read_json, write_json
from olora.layout import Layout


def register(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage: models/exported + metrics/eval_adapter.json -> a registered version, reports/registration.json."""
    from olora.tracking import registry
    from olora.tracking.client import resolve_uri

    cfg = load_config(layout.params, overrides)
    if not cfg.tracking.enabled:
        record: dict[str, Any] = {"registered": False, "reason": "tracking.enabled is false"}
    else:
        reg = registry.register(cfg, layout.root, layout.adapter, layout.exported, read_json(layout.metrics("eval_adapter")))
        record = {"registered": True, **registry.registration_record(reg, resolve_uri(cfg.tracking, layout.root))}
    write_json(layout.registration, record)
    return record
