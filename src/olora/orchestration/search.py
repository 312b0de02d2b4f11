"""The learning-rate search of one method at one rank: an Optuna study in an RDB storage that many workers share.

One study per (method, rank), named by the comparison it belongs to. A trial is a short training
run (prepare, init, train in a workspace of its own, `train.max_steps` of the search settings) at a
rate drawn log-uniformly from the settings' range (Optuna's TPE sampler); every validation loss
the Trainer computes is reported to the trial as an intermediate value, and Optuna's median pruner
stops a trial whose loss is worse than the median of earlier trials at the same step.

Each trial is one Prefect flow run (`flows/olora_compare.py:olora_search_trial`), which any worker
picks up; it calls `run_trial`, which runs `study.optimize(n_trials=1)` so Optuna keeps the trial's
heartbeat. A worker killed mid-trial stops the heartbeat: after `grace` seconds the next process
that opens the study (another trial, or the comparison waiting for its budget) marks it FAIL and
`RetryHeartbeatStaleTrialCallback` enqueues the same rate again, which the next trial takes. Nothing is lost
silently: a failed trial stays in the study, with its retry's number in the retry's system attrs.

Storage: `sqlite:///<file>` on one machine, `postgresql+psycopg2://...` for a team
(`$OLORA_OPTUNA_STORAGE`); each trial is also an MLflow child run of the comparison's parent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from olora.config import edit_params, load_config
from olora.errors import ConfigError
from olora.faults import marker
from olora.layout import RUN_FILE, Layout
from olora.orchestration import pipeline as P
from olora.orchestration import workspace

log = logging.getLogger("olora")
STORAGE_ENV = "OLORA_OPTUNA_STORAGE"
PARAM = "learning_rate"


@dataclass(frozen=True)
class SearchSettings:
    lr_low: float = 1e-5
    """Lowest learning rate tried (the range is searched log-uniformly)."""
    lr_high: float = 3e-3
    """Highest learning rate tried."""
    trials: int = 8
    """Trial budget per study: finished (complete or pruned) trials per (method, rank)."""
    startup_trials: int = 2
    """Trials that finish before the median pruner may stop one (Optuna's n_startup_trials)."""
    warmup_steps: int = 0
    """Training steps before a trial may be pruned (Optuna's n_warmup_steps)."""
    steps: int = 60
    """train.max_steps of a trial (a short run)."""
    eval_steps: int = 10
    """train.eval_steps of a trial: every this many steps a validation loss is reported to the pruner."""
    heartbeat: int = 10
    """Seconds between a running trial's heartbeats in the storage."""
    grace: int = 60
    """Seconds without a heartbeat after which a trial counts as killed: marked FAIL and its rate retried."""
    max_retry: int = 2
    """How often a killed trial's rate is retried before it is given up (it stays FAIL in the study)."""

    def check(self) -> None:
        """Refuse settings that cannot make a search, naming the setting and the fix (before any work)."""
        if not (self.lr_low > 0 and math.isfinite(self.lr_low) and math.isfinite(self.lr_high)):
            raise ConfigError(f"search rate range [{self.lr_low:g}, {self.lr_high:g}]: the low end must be a finite rate > 0 "
                              "(the range is log-uniform); e.g. --lr-range 1e-5,3e-3")
        if self.lr_high <= self.lr_low:
            raise ConfigError(f"search rate range [{self.lr_low:g}, {self.lr_high:g}] is "
                              f"{'empty' if self.lr_high == self.lr_low else 'inverted'}: give LOW,HIGH with LOW < HIGH, "
                              "e.g. --lr-range 1e-5,3e-3")
        from olora.core.study import pruner_minimum_trials

        need = pruner_minimum_trials(self.startup_trials)
        if self.startup_trials < 1 or self.trials < need:
            raise ConfigError(f"search trial budget {self.trials} with {self.startup_trials} start-up trial(s): the median "
                              f"pruner needs at least 1 start-up trial and a budget of at least {need} "
                              f"(start-up trials + 1) to prune anything; raise --trials to {need} or lower --startup-trials")
        if self.steps < 1 or not 1 <= self.eval_steps <= self.steps:
            raise ConfigError(f"search steps={self.steps}, eval_steps={self.eval_steps}: a trial needs at least one "
                              "validation loss to report; use 1 <= eval_steps <= steps")
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"search warmup_steps={self.warmup_steps} >= steps={self.steps}: no trial could ever be "
                              "pruned; lower --warmup-steps")
        if self.heartbeat < 1 or self.grace <= self.heartbeat or self.max_retry < 1:
            raise ConfigError(f"search heartbeat={self.heartbeat}, grace={self.grace}, max_retry={self.max_retry}: use "
                              "heartbeat >= 1 s, grace > heartbeat and max_retry >= 1, so a killed trial is retried")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_url(source: Path, url: str | None = None) -> str:
    """The study storage: `url`, else $OLORA_OPTUNA_STORAGE (a team's PostgreSQL), else a SQLite file in the project."""
    url = url or os.environ.get(STORAGE_ENV, "")
    if url:
        return url
    path = Path(source).resolve() / ".olora" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def storage(url: str, settings: SearchSettings):
    """Optuna's RDB storage with heartbeats; a trial whose heartbeat stops is marked FAIL and retried."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=settings.heartbeat, grace_period=settings.grace,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry),
                          engine_kwargs={"pool_pre_ping": True})


def open_study(url: str, name: str, settings: SearchSettings):
    """Create the study, or load it when another process already did (the same settings every time)."""
    import optuna

    return optuna.create_study(study_name=name, storage=storage(url, settings), direction="minimize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(),  # unseeded: every process draws its own rates (a seed would repeat them)
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                                                  n_warmup_steps=settings.warmup_steps))


def finished(study) -> int:
    """Trials that count against the budget: complete or pruned (failed ones are retried, not counted)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def running(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


def fail_stale(study) -> None:
    """Mark trials whose heartbeat stopped as FAIL (their retry is enqueued by the storage's callback)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def trials_table(study) -> list[dict[str, Any]]:
    """Every trial: number, rate, state, its last reported loss (final for a complete trial), retry of which trial."""
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    rows = []
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # retried_trial_number: stable since 2.8
    for t in study.get_trials(deepcopy=False):
        last = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        rows.append({"number": t.number, "lr": t.params.get(PARAM), "state": t.state.name, "loss": last,
                     "step": max(t.intermediate_values) if t.intermediate_values else None,
                     "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t), "mlflow_run": t.user_attrs.get("mlflow_run")})
    return rows


def best_rate(study) -> float:
    """The rate of the study's best complete trial."""
    return float(study.best_trial.params[PARAM])


def _pruning_callback(trial):
    from transformers import TrainerCallback

    class Pruning(TrainerCallback):
        """Report each validation loss to the trial; stop training (cleanly, the run recorded) when it is pruned."""

        pruned_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not metrics or "eval_loss" not in metrics:
                return
            trial.report(float(metrics["eval_loss"]), int(state.global_step))
            marker("search:reported")
            if trial.should_prune():
                self.pruned_at = int(state.global_step)
                control.should_training_stop = True

    return Pruning()


def trial_overrides(method: str, r: int, alpha_per_rank: float, lr: float, settings: SearchSettings,
                    tracking_uri: str) -> dict[str, Any]:
    return {"adapter.init": method, "adapter.r": r, "adapter.alpha": float(alpha_per_rank * r),
            "train.learning_rate": lr, "train.max_steps": settings.steps, "train.eval_steps": settings.eval_steps,
            "train.save_steps": settings.steps, "train.warmup_steps": max(1, settings.steps // 10),
            "tracking.uri": tracking_uri}


def run_trial(source: Path, url: str, study_name: str, method: str, r: int, alpha_per_rank: float,
              settings: SearchSettings, tracking_uri: str, parent_run_id: str | None, name: str) -> dict[str, Any]:
    """One trial of the study, in a workspace cloned from `source` (a retried rate first); returns what it did.

    Nothing runs when the study already has its budget of finished trials.
    """
    import optuna

    from olora.stages import STAGES
    from olora.tracking.client import Tracking

    study = open_study(url, study_name, settings)
    if finished(study) >= settings.trials:
        return {"study": study_name, "ran": False}
    done: dict[str, Any] = {"study": study_name, "ran": True}

    def objective(trial) -> float:
        lr = trial.suggest_float(PARAM, settings.lr_low, settings.lr_high, log=True)
        ws = P.open_workspace(source, f"{name}-t{trial.number}")
        layout = Layout(ws)
        edit_params(layout.params, trial_overrides(method, r, alpha_per_rank, lr, settings, tracking_uri))
        tracking = Tracking.of(load_config(layout.params), ws)
        for stage in ("prepare", "init"):
            P.run_stage(stage, layout, tracking)
        callback = _pruning_callback(trial)
        metrics = STAGES["train"].run(layout, tracking=tracking, callbacks=[callback])
        run = json.loads((layout.adapter / RUN_FILE).read_text()) if (layout.adapter / RUN_FILE).is_file() else {}
        if run.get("run_id"):
            trial.set_user_attr("mlflow_run", run["run_id"])
            if tracking.enabled:
                c = tracking.client()
                tags = {"olora.study": study_name, "olora.trial": str(trial.number), "olora.learning_rate": f"{lr:.6g}",
                        "olora.trial_state": "PRUNED" if callback.pruned_at is not None else "COMPLETE"}
                if parent_run_id:
                    tags["mlflow.parentRunId"] = parent_run_id  # a child of the comparison's run in MLflow's UI
                for key, value in tags.items():
                    c.set_tag(run["run_id"], key, value)
        workspace.remove(ws)  # a trial's result is the study's record and its MLflow run; the workspace holds nothing more
        done.update(trial=trial.number, lr=lr, final_val_loss=metrics["final_val_loss"], pruned_at=callback.pruned_at)
        if callback.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {callback.pruned_at}")
        return float(metrics["final_val_loss"])

    study.optimize(objective, n_trials=1, catch=())
    return done

