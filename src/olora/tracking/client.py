"""The MLflow client: which server (one precedence rule), reachability, retries with backoff, experiments."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from olora.config import TrackingConfig
from olora.errors import OloraError

log = logging.getLogger("olora")
T = TypeVar("T")


class TrackingError(OloraError):
    """The tracking server is unreachable or refused a request."""


def resolve_uri(cfg: TrackingConfig, root: Path) -> str:
    """The one rule: `tracking.uri` when set, else $MLFLOW_TRACKING_URI, else a SQLite store in the project."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db')}"


def artifact_location(root: Path) -> str:
    return (Path(root).resolve() / "mlartifacts").as_uri()


def with_retries(what: str, uri: str, fn: Callable[[], T], attempts: int = 3, base_delay: float = 1.0) -> T:
    """Call fn, retrying transient failures with exponential backoff; then a clear error naming the URI."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return fn()
        except OloraError:
            raise
        except Exception as exc:  # MLflow surfaces network failures as several types
            last = exc
            if attempt + 1 < attempts:
                delay = base_delay * 2**attempt
                log.warning("%s failed against %s (%s); retrying in %.0fs", what, uri, exc, delay)
                time.sleep(delay)
    raise TrackingError(
        f"{what} failed against the MLflow tracking server {uri} after {attempts} attempts: {last}. "
        "Check that the server is running and MLFLOW_TRACKING_URI / tracking.uri is right; the "
        "pipeline's outputs are intact, so the stage can simply be re-run."
    ) from last


def client(cfg: TrackingConfig, root: Path):
    """An MlflowClient for the resolved URI, checked to be reachable."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # our own retries (with_retries) handle transient failures: keep MLflow's inner HTTP retries short
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow import MlflowClient

    uri = resolve_uri(cfg, root)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with_retries("connecting", uri, lambda: c.search_experiments(max_results=1), attempts=cfg.retries)
    return c


def experiment_id(c, cfg: TrackingConfig, root: Path) -> str:
    found = c.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    uri = c.tracking_uri
    location = artifact_location(root) if uri.startswith("sqlite:") else None
    return c.create_experiment(cfg.experiment, artifact_location=location)
