"""A transformers Trainer callback that sends training metrics to MLflow in batches."""

from __future__ import annotations

import time
from typing import Any

from olora.tracking.client import with_retries
from olora.tracking.runs import log_metric_series


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
