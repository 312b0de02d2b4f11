"""Metric series: the Trainer's log keys and their MLflow names, and batched sends of (step, value) points."""

from __future__ import annotations

import time
from typing import Any

# Trainer log key -> MLflow metric name (what the callback sends during training and the stage reconciles after)
TRAINER_KEYS = {"loss": "train/loss", "eval_loss": "val/loss", "learning_rate": "train/learning_rate",
                "grad_norm": "train/grad_norm"}


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


def history_series(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The Trainer's log history as MLflow metric series (the names the callback sends during training)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for key, name in TRAINER_KEYS.items():
            if isinstance(entry.get(key), (int, float)) and "step" in entry:
                series.setdefault(name, []).append((int(entry["step"]), float(entry[key])))
    return series
