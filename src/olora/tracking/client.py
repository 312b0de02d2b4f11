"""The MLflow client: which server (one precedence rule), reachability, retries with backoff, experiments.

Each entry point (a stage, an `olora` command, a flow) resolves the rule once into a `Tracking`
value and passes it down; nothing below it looks at `tracking.uri` or `$MLFLOW_TRACKING_URI` again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from olora.config import TrackingConfig
from olora.errors import OloraError

log = logging.getLogger("olora")
T = TypeVar("T")


class TrackingError(OloraError):
    """The tracking server is unreachable or refused a request."""


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")
# HTTP statuses and MLflow error codes meaning "these credentials are not accepted": never transient
_REFUSED_STATUS = {401: "401 Unauthorized", 403: "403 Forbidden"}
_REFUSED_CODES = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "CUSTOMER_UNAUTHORIZED": 401}


def redact_uri(uri: str) -> str:
    """`https://user:secret@host/x` -> `https://host/x`: a URI (or any text holding URIs) safe to show or log."""
    return _USERINFO.sub(r"\g<scheme>", str(uri))


def refused_status(exc: BaseException) -> int | None:
    """401 or 403 when `exc` says the tracking server refused the credentials, else None."""
    code = getattr(exc, "error_code", None)
    if code in _REFUSED_CODES:
        return _REFUSED_CODES[code]
    response = getattr(exc, "response", None)  # requests.HTTPError
    status = getattr(response, "status_code", None)
    if status in _REFUSED_STATUS:
        return status
    found = re.search(r"error code (401|403)\b", str(exc))
    return int(found.group(1)) if found else None


def credentials_error(what: str, uri: str, status: int, exc: BaseException | None = None) -> TrackingError:
    """The error for a 401/403. Its first line names the server (no password) and the variables to set."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    who = f"user {user!r}" if user else ("given in the URI" if redact_uri(uri) != uri else "none were set")
    if status == 403:
        fix = "that account lacks permission: use an account with access, or ask the server's admin to grant it"
    else:
        fix = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on that server"
    detail = f"\nNot retried (wrong credentials do not fix themselves). Server said: {redact_uri(str(exc))}" if exc else ""
    return TrackingError(
        f"the MLflow tracking server {redact_uri(uri)} refused the credentials ({who}) while {what} "
        f"(HTTP {_REFUSED_STATUS[status]}); {fix} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)" + detail
    )


def resolve_uri(cfg: TrackingConfig, root: Path) -> str:
    """The one rule: `tracking.uri` when set, else $MLFLOW_TRACKING_URI, else a SQLite store in the project."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db')}"


def artifact_location(uri: str) -> str:
    """Artifacts of a SQLite store live beside its database file (the project's mlartifacts/)."""
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def with_retries(what: str, uri: str, fn: Callable[[], T], attempts: int = 3, base_delay: float = 1.0) -> T:
    """Call fn, retrying transient failures with exponential backoff; then a clear error naming the URI."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return fn()
        except OloraError:
            raise
        except Exception as exc:  # MLflow surfaces network failures as several types
            status = refused_status(exc)
            if status is not None:  # not transient: fail at once
                raise credentials_error(what, uri, status, exc) from exc
            last = exc
            if attempt + 1 < attempts:
                delay = base_delay * 2**attempt
                log.warning("%s failed against %s (%s); retrying in %.0fs", what, redact_uri(uri), redact_uri(str(exc)), delay)
                time.sleep(delay)
    raise TrackingError(
        f"{what} failed against the MLflow tracking server {redact_uri(uri)} after {attempts} attempts: "
        f"{redact_uri(str(last))}. "
        "Check that the server is running and MLFLOW_TRACKING_URI / tracking.uri is right; the "
        "pipeline's outputs are intact, so the stage can simply be re-run."
    ) from last


@dataclass(frozen=True)
class Tracking:
    """Where runs and models go, resolved once: the server URI (the one rule applied), experiment, retries."""

    uri: str
    experiment: str = "olora"
    retries: int = 3
    enabled: bool = True

    @classmethod
    def resolve(cls, cfg: TrackingConfig, root: Path) -> "Tracking":
        return cls(resolve_uri(cfg, root), cfg.experiment, cfg.retries, cfg.enabled)

    @classmethod
    def of(cls, cfg, root: Path) -> "Tracking":
        """From a whole `Config` (its `tracking` block)."""
        return cls.resolve(cfg.tracking, root)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn() with this server's retries and error message."""
        return with_retries(what, self.uri, fn, self.retries)

    def client(self):
        """An MlflowClient for this server, checked to be reachable."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # our own retries (with_retries) handle transient failures: keep MLflow's inner HTTP retries short
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # artifacts through the server itself: its presigned S3 URLs name the store as the server reaches it (compose's
        # http://seaweedfs:8333), which a client on another host cannot resolve (downloads then retried without end)
        os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        with_retries("connecting", self.uri, lambda: c.search_experiments(max_results=1), attempts=self.retries)
        return c


def experiment_id(c, experiment: str) -> str:
    """The experiment's id, created on first use (a SQLite store keeps its artifacts beside the database)."""
    found = c.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    uri = c.tracking_uri
    location = artifact_location(uri) if uri.startswith("sqlite:///") else None
    return c.create_experiment(experiment, artifact_location=location)
