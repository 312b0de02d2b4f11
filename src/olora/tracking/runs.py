"""One MLflow run per trained adapter, holding its training and its evaluation.

The train stage opens the run and records its id in its DVC output (`models/adapter/mlflow_run.json`);
later stages reopen that run by id, so a stage that DVC skips never creates a stray run. Metrics are
sent in batches (one call per chunk of ~1000 values), so logging costs a negligible share of a step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olora import dvc, layout
from olora.config import Config
from olora.tracking.client import Tracking, experiment_id
from olora.tracking.datasets import evaluation_inputs, prepared_inputs
from olora.tracking.lineage import TAGS, git_commit, package_versions
from olora.tracking.names import run_name
from olora.tracking.series import history_series, log_metric_series, log_values

# The experiment-kind tag of MLflow 3 (its UI's "mlflow.experimentKind"); "custom_model_development" is the
# "Machine learning" (model training) kind, as opposed to "genai_development". MLflow 3.17.2's UI reads it only
# with its GenAI/Model-training switch turned off; with the switch (the default) the view follows the switch.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


@dataclass(frozen=True)
class RunHandle:
    """An open MLflow run: its client, id and the tracking settings it was opened with."""

    client: Any
    run_id: str
    tracking: Tracking

    def call(self, what: str, fn):
        return self.tracking.call(what, fn)


def write_run_file(folder: Path, run_id: str, uri: str, experiment: str) -> None:
    (Path(folder) / layout.RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment": experiment}) + "\n")


def read_run_file(folder: Path) -> dict[str, str] | None:
    path = Path(folder) / layout.RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def start_training_run(cfg: Config, tracking: Tracking, root: Path, ref_name: str, ref_revision: str,
                       resume_run_id: str | None = None) -> RunHandle:
    """Open the MLflow run of a new adapter: parameters, lineage tags.

    With `resume_run_id` (an interrupted run being resumed from its checkpoints) that run is
    reopened instead, so one adapter keeps one run however often its training was interrupted.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    c = tracking.client()
    if resume_run_id:
        try:
            tracking.call("reopening the run", lambda: c.update_run(resume_run_id, status="RUNNING"))
            tracking.call("tagging the run", lambda: c.set_tag(resume_run_id, "resumed", "true"))
            return RunHandle(c, resume_run_id, tracking)
        except MlflowException:  # deleted, or another tracking server: start a new run
            pass
    exp = tracking.call("creating the experiment", lambda: experiment_id(c, tracking.experiment))
    if EXPERIMENT_KIND_TAG not in tracking.call("reading the experiment", lambda: c.get_experiment(exp)).tags:
        # a training experiment (a kind set by hand in the UI stays)
        tracking.call("tagging the experiment", lambda: c.set_experiment_tag(exp, EXPERIMENT_KIND_TAG, TRAINING_KIND))
    tags = {
        "mlflow.runName": run_name(cfg),
        "mlflow.source.git.commit": git_commit(root),
        "base_model": ref_name,
        "base_model_revision": ref_revision,
        "adapter_init": cfg.adapter.init,
        TAGS["data_hash"]: dvc.out_hash(root, "prepare", layout.DATA),
        "dvc.init_hash": dvc.out_hash(root, "init", layout.INIT),
        **package_versions(),
    }
    run = tracking.call("creating the run", lambda: c.create_run(exp, run_name=run_name(cfg)))
    run_id = run.info.run_id
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in cfg.flat().items()]
    tracking.call("logging parameters",
                  lambda: c.log_batch(run_id, params=params, tags=[RunTag(k, str(v)) for k, v in tags.items()]))
    datasets = prepared_inputs(root, cfg.data.source, tags[TAGS["data_hash"]], tags["mlflow.source.git.commit"])
    tracking.call("logging the data sets", lambda: c.log_inputs(run_id, datasets=datasets))
    return RunHandle(c, run_id, tracking)


def finish_training_run(run: RunHandle, cfg: Config, metrics: dict[str, Any], history: list[dict[str, Any]],
                        exported_dir: Path, adapter_dir: Path) -> None:
    """Log the training summary, loss-curve plot and exported adapter; record the run id in the adapter's output."""
    import tempfile

    c, run_id = run.client, run.run_id
    numeric = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.call("sending the logged history", lambda: send_missing_history(c, run_id, history))
    run.call("logging the training summary", lambda: log_values(c, run_id, numeric))
    with tempfile.TemporaryDirectory() as tmp:
        plot = loss_plot(history, Path(tmp) / "loss_curve.png", run_name(cfg))
        run.call("uploading the loss curve", lambda: c.log_artifact(run_id, str(plot)))
    run.call("uploading the exported adapter", lambda: c.log_artifacts(run_id, str(exported_dir), "exported_adapter"))
    write_run_file(adapter_dir, run_id, run.tracking.uri, run.tracking.experiment)
    run.call("finishing the run", lambda: c.set_terminated(run_id, "FINISHED"))


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


def log_evaluation(run: RunHandle, base: olora.evaluation.result.EvalResult,
                   tuned: olora.evaluation.result.EvalResult, report: Path, artifacts: list[Path] = ()) -> None:
    """(The result's type is named, not imported: the train stage, which imports this module, runs none of it.)

    Add base and fine-tuned scores, their differences (paired, with intervals) and the report to the adapter's
    run; `artifacts` (the per-question results and the evaluation's metrics) go under `eval/`."""
    values: dict[str, float] = {}
    for prefix, scores in (("eval", tuned), ("base", base)):
        values[f"{prefix}/mean_acc"] = scores.mean_acc
        values[f"{prefix}/mean_acc_norm"] = scores.mean_acc_norm
        for task, entry in scores.tasks.items():
            for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
                if getattr(entry, key) is not None:
                    values[f"{prefix}/{task}/{key}"] = getattr(entry, key)
    for task, delta in (tuned.delta_vs_base or {}).items():
        values[f"delta/{task}"] = delta
    if tuned.vs_base is not None:
        for key in ("diff", "low", "high", "mde", "n"):
            values[f"vs_base/{key}"] = getattr(tuned.vs_base, key)
    run.call("logging evaluation", lambda: log_values(run.client, run.run_id, values))
    if datasets := evaluation_inputs(tuned):
        run.call("logging the evaluation sets", lambda: run.client.log_inputs(run.run_id, datasets=datasets))
    run.call("uploading the report", lambda: run.client.log_artifact(run.run_id, str(report)))
    for path in artifacts:
        run.call(f"uploading {Path(path).name}", lambda path=path: run.client.log_artifact(run.run_id, str(path), layout.EVAL_ARTIFACTS))


def reopen(tracking: Tracking, adapter_dir: Path) -> RunHandle | None:
    """The adapter's run, from the id its train stage recorded in `adapter_dir`; None when there is none."""
    recorded = read_run_file(adapter_dir)
    return RunHandle(tracking.client(), recorded["run_id"], tracking) if recorded else None


def tag_recorded(tracking: Tracking, tags: dict[str, str], run_id: str | None,
                 model: str | None = None, version: str | None = None) -> None:
    """Put a recorded run's git state (`RunRecord.to_tags()`: `olora.git_branch`, ...) on its MLflow run and model version."""
    c = tracking.client()
    for key, value in tags.items():
        if run_id:
            tracking.call("tagging the run", lambda: c.set_tag(run_id, key, value))
        if model and version:
            tracking.call("tagging the model version", lambda: c.set_model_version_tag(model, version, key, value))
