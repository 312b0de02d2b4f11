"""MLflow tracking: one run per trained adapter, holding its training and its evaluation.

The train stage opens the run and records its id in its DVC output (`models/adapter/mlflow_run.json`);
later stages reopen that run by id, so a stage that DVC skips never creates a stray run. Metrics are
sent in batches (one call per chunk of ~1000 values), so logging costs a negligible share of a step.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from olora.config import Config, TrackingConfig
from olora.errors import OloraError
from olora.models import short_name

log = logging.getLogger("olora")
RUN_FILE = "mlflow_run.json"
PACKAGES = ["torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "mlflow", "dvc"]
T = TypeVar("T")


class TrackingError(OloraError):
    """The tracking server is unreachable or refused a request."""


def resolve_uri(cfg: TrackingConfig, root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else `tracking.uri`, else a SQLite store in the project folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
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


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_out_hash(root: Path, stage: str, path: str) -> str:
    """The hash DVC recorded in dvc.lock for a stage output ('' when not run under DVC)."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return ""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return str(out.get("md5", ""))
    return ""


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_name(cfg: Config) -> str:
    base = short_name(cfg.model.name)
    return f"{cfg.adapter.init}-r{cfg.adapter.r}-{base}"


def log_metric_series(c, run_id: str, series: dict[str, list[tuple[int, float]]]) -> float:
    """Log many (step, value) points with batched calls; returns the seconds spent."""
    from mlflow.entities import Metric

    start = time.perf_counter()
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(v), now, int(step)) for key, points in series.items() for step, v in points]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i : i + 1000])
    return time.perf_counter() - start


def log_values(c, run_id: str, values: dict[str, float], step: int = 0) -> None:
    log_metric_series(c, run_id, {k: [(step, v)] for k, v in values.items() if isinstance(v, (int, float))})


def write_run_file(folder: Path, run_id: str, uri: str, experiment: str) -> None:
    (Path(folder) / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment": experiment}) + "\n")


def read_run_file(folder: Path) -> dict[str, str] | None:
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class BatchLogger:
    """Trainer callback that buffers logged values and sends them in batches (every `every` seconds)."""

    def __init__(self, c, run_id: str, every: float = 30.0):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_log(cb, args, state, control, logs=None, **kwargs):
                self.add(state.global_step, logs or {})

            def on_train_end(cb, args, state, control, **kwargs):
                self.flush()

        self.client, self.run_id, self.every = c, run_id, every
        self.pending: dict[str, list[tuple[int, float]]] = {}
        self.seconds = 0.0
        self.last = time.perf_counter()
        self.callback = _Callback()

    KEYS = {"loss": "train/loss", "eval_loss": "val/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}

    def add(self, step: int, logs: dict[str, Any]) -> None:
        start = time.perf_counter()
        for key, name in self.KEYS.items():
            if isinstance(logs.get(key), (int, float)):
                self.pending.setdefault(name, []).append((step, float(logs[key])))
        self.seconds += time.perf_counter() - start
        if time.perf_counter() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, {}
            self.seconds += with_retries(
                "logging metrics", self.client.tracking_uri, lambda: log_metric_series(self.client, self.run_id, batch)
            )
        self.last = time.perf_counter()


def start_training_run(cfg: Config, root: Path, ref_name: str, ref_revision: str):
    """Open the MLflow run of a new adapter: parameters, lineage tags. Returns (client, run_id)."""
    from mlflow.entities import Param, RunTag

    c = client(cfg.tracking, root)
    uri = c.tracking_uri
    exp = with_retries("creating the experiment", uri, lambda: experiment_id(c, cfg.tracking, root), cfg.tracking.retries)
    tags = {
        "mlflow.runName": run_name(cfg),
        "mlflow.source.git.commit": git_commit(root),
        "base_model": ref_name,
        "base_model_revision": ref_revision,
        "adapter_init": cfg.adapter.init,
        "dvc.data_hash": dvc_out_hash(root, "prepare", "data/prepared"),
        "dvc.init_hash": dvc_out_hash(root, "init", "models/init"),
        **package_versions(),
    }
    run = with_retries("creating the run", uri, lambda: c.create_run(exp, run_name=run_name(cfg)), cfg.tracking.retries)
    run_id = run.info.run_id
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in cfg.flat().items()]
    with_retries(
        "logging parameters",
        uri,
        lambda: c.log_batch(run_id, params=params, tags=[RunTag(k, str(v)) for k, v in tags.items()]),
        cfg.tracking.retries,
    )
    return c, run_id


def finish_training_run(c, run_id: str, cfg: Config, metrics: dict[str, Any], history: list[dict[str, Any]],
                        exported_dir: Path, adapter_dir: Path) -> None:
    """Log the training summary, loss-curve plot and exported adapter; record the run id in the adapter's output."""
    import tempfile

    numeric = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with_retries("logging the training summary", c.tracking_uri, lambda: log_values(c, run_id, numeric), cfg.tracking.retries)
    with tempfile.TemporaryDirectory() as tmp:
        c.log_artifact(run_id, str(loss_plot(history, Path(tmp) / "loss_curve.png", run_name(cfg))))
    c.log_artifacts(run_id, str(exported_dir), "exported_adapter")
    write_run_file(adapter_dir, run_id, c.tracking_uri, cfg.tracking.experiment)
    c.set_terminated(run_id, "FINISHED")


def loss_plot(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
