"""A transformers Trainer callback that sends training metrics to MLflow in batches, outages tolerated.

A failed send keeps the values (training never waits on, or fails for, the tracking server) and
tries again at the next batch; sends are also attempted at every checkpoint save. The end of the
stage reconciles with the server from the Trainer's own history (`runs.send_missing_history`),
so values held back by an outage, or lost with a killed process, still arrive, exactly once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from olora.tracking.client import redact_uri
from olora.tracking.series import TRAINER_KEYS, log_metric_series

log = logging.getLogger("olora")


class BatchLogger:
    """Trainer callback that buffers logged values and sends them in batches (every `every` seconds)."""

    def __init__(self, c, run_id: str, every: float = 30.0, held: set[tuple[str, int]] | None = None):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_log(cb, args, state, control, logs=None, **kwargs):
                self.add(state.global_step, logs or {})

            def on_save(cb, args, state, control, **kwargs):
                self.flush()

            def on_train_end(cb, args, state, control, **kwargs):
                self.flush()

        self.client, self.run_id, self.every = c, run_id, every
        self.pending: dict[str, list[tuple[int, float]]] = {}
        self.held = held or set()  # (name, step) the run already holds: a resumed run re-logs them
        self.seconds = 0.0
        self.failures = 0
        self.sends = 0  # successful batch sends: the request count the server saw
        self.values_sent = 0
        self.last = time.perf_counter()
        self.callback = _Callback()

    KEYS = TRAINER_KEYS

    def add(self, step: int, logs: dict[str, Any]) -> None:
        start = time.perf_counter()
        for key, name in self.KEYS.items():
            if isinstance(logs.get(key), (int, float)) and (name, step) not in self.held:
                self.pending.setdefault(name, []).append((step, float(logs[key])))
        self.seconds += time.perf_counter() - start
        if time.perf_counter() - self.last >= self.every:
            self.flush()

    @classmethod
    def held_by(cls, c, run_id: str) -> set[tuple[str, int]]:
        """The (name, step) points a run already holds (for a resumed run); empty when the server cannot say."""
        try:
            return {(name, m.step) for name in cls.KEYS.values() for m in c.get_metric_history(run_id, name)}
        except Exception:  # noqa: BLE001 - reconciled at the end of the stage anyway
            return set()

    def flush(self) -> bool:
        """Try once to send what is pending; on failure keep it for the next try. Returns whether all was sent."""
        start = time.perf_counter()
        self.last = start
        if not self.pending:
            return True
        batch, self.pending = self.pending, {}
        try:
            log_metric_series(self.client, self.run_id, batch)
        except Exception as exc:  # noqa: BLE001 - any network/server failure: keep the values, keep training
            for name, points in batch.items():
                self.pending[name] = points + self.pending.get(name, [])
            self.failures += 1
            log.warning("tracking server %s unreachable (%s); keeping %d values to send later, training goes on",
                        redact_uri(self.client.tracking_uri), type(exc).__name__, sum(len(p) for p in self.pending.values()))
            return False
        finally:
            self.seconds += time.perf_counter() - start
        self.sends += 1
        self.values_sent += sum(len(points) for points in batch.values())
        if self.failures:
            log.info("tracking server reachable again: sent the values it missed")
            self.failures = 0
        return True
