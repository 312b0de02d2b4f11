"""One MLflow run per trained adapter, holding its training and its evaluation.

The train stage opens the run and records its id in its DVC output (`models/adapter/mlflow_run.json`);
later stages reopen that run by id, so a stage that DVC skips never creates a stray run. Metrics are
sent in batches (one call per chunk of ~1000 values), so logging costs a negligible share of a step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from olora import dvc, layout
from olora.config import Config
from olora.models import short_name
from olora.tracking.client import client, experiment_id, with_retries
from olora.tracking.lineage import git_commit, package_versions


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
    (Path(folder) / layout.RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment": experiment}) + "\n")


def read_run_file(folder: Path) -> dict[str, str] | None:
    path = Path(folder) / layout.RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def start_training_run(cfg: Config, root: Path, ref_name: str, ref_revision: str, resume_run_id: str | None = None):
    """Open the MLflow run of a new adapter: parameters, lineage tags. Returns (client, run_id).

    With `resume_run_id` (an interrupted run being resumed from its checkpoints) that run is
    reopened instead, so one adapter keeps one run however often its training was interrupted.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    c = client(cfg.tracking, root)
    uri = c.tracking_uri
    if resume_run_id:
        try:
            with_retries("reopening the run", uri, lambda: c.update_run(resume_run_id, status="RUNNING"), cfg.tracking.retries)
            with_retries("tagging the run", uri, lambda: c.set_tag(resume_run_id, "resumed", "true"), cfg.tracking.retries)
            return c, resume_run_id
        except MlflowException:  # deleted, or another tracking server: start a new run
            pass
    exp = with_retries("creating the experiment", uri, lambda: experiment_id(c, cfg.tracking, root), cfg.tracking.retries)
    tags = {
        "mlflow.runName": run_name(cfg),
        "mlflow.source.git.commit": git_commit(root),
        "base_model": ref_name,
        "base_model_revision": ref_revision,
        "adapter_init": cfg.adapter.init,
        "dvc.data_hash": dvc.out_hash(root, "prepare", layout.DATA),
        "dvc.init_hash": dvc.out_hash(root, "init", layout.INIT),
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

    uri, retries = c.tracking_uri, cfg.tracking.retries
    numeric = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with_retries("sending the logged history", uri, lambda: send_missing_history(c, run_id, history), retries)
    with_retries("logging the training summary", uri, lambda: log_values(c, run_id, numeric), retries)
    with tempfile.TemporaryDirectory() as tmp:
        plot = loss_plot(history, Path(tmp) / "loss_curve.png", run_name(cfg))
        with_retries("uploading the loss curve", uri, lambda: c.log_artifact(run_id, str(plot)), retries)
    with_retries("uploading the exported adapter", uri, lambda: c.log_artifacts(run_id, str(exported_dir), "exported_adapter"), retries)
    write_run_file(adapter_dir, run_id, uri, cfg.tracking.experiment)
    with_retries("finishing the run", uri, lambda: c.set_terminated(run_id, "FINISHED"), retries)


def history_series(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The Trainer's log history as MLflow metric series (the names BatchLogger sends during training)."""
    from olora.tracking.callback import BatchLogger

    series: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for key, name in BatchLogger.KEYS.items():
            if isinstance(entry.get(key), (int, float)) and "step" in entry:
                series.setdefault(name, []).append((int(entry["step"]), float(entry[key])))
    return series


def send_missing_history(c, run_id: str, history: list[dict[str, Any]]) -> int:
    """Send every logged point the server does not hold yet; returns how many were sent.

    The Trainer's history (saved in every checkpoint) is the record: points lost to a tracking
    outage during training, or to a crash before a batch was sent, reach the run here, once.
    """
    missing: dict[str, list[tuple[int, float]]] = {}
    for name, points in history_series(history).items():
        held = {m.step for m in c.get_metric_history(run_id, name)}
        todo = [(step, value) for step, value in points if step not in held]
        if todo:
            missing[name] = todo
    if missing:
        log_metric_series(c, run_id, missing)
    return sum(len(v) for v in missing.values())


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


def log_evaluation(c, run_id: str, base: dict[str, Any], tuned: dict[str, Any], report: Path, retries: int) -> None:
    """Add base and fine-tuned scores (and their differences) and the report to the adapter's run."""
    values: dict[str, float] = {}
    for prefix, scores in (("eval", tuned), ("base", base)):
        values[f"{prefix}/mean_acc"] = scores["mean_acc"]
        values[f"{prefix}/mean_acc_norm"] = scores["mean_acc_norm"]
        for task, entry in scores["tasks"].items():
            for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
                if key in entry:
                    values[f"{prefix}/{task}/{key}"] = entry[key]
    for task, delta in tuned.get("delta_vs_base", {}).items():
        values[f"delta/{task}"] = delta
    with_retries("logging evaluation", c.tracking_uri, lambda: log_values(c, run_id, values), retries)
    with_retries("uploading the report", c.tracking_uri, lambda: c.log_artifact(run_id, str(report)), retries)


def tag_recorded(cfg: Config, root: Path, tags: dict[str, str], run_id: str | None,
                 model: str | None = None, version: str | None = None) -> None:
    """Put a recorded run's git state (`olora.git_branch`, `olora.git_commit`, ...) on its MLflow run and model version."""
    c = client(cfg.tracking, root)
    uri, retries = c.tracking_uri, cfg.tracking.retries
    for key, value in tags.items():
        if run_id:
            with_retries("tagging the run", uri, lambda: c.set_tag(run_id, key, value), retries)
        if model and version:
            with_retries("tagging the model version", uri, lambda: c.set_model_version_tag(model, version, key, value), retries)
