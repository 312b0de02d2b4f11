"""The pipeline's stages as functions of (params file, layout): what `dvc.yaml` and Prefect call.

Each stage reads the typed config, resolves model and runtime, calls the library function that
does the work, and writes its outputs and DVC metrics. Stages exchange paths, never models.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olora.config import Config, load_config
from olora.io import read_json, write_json, write_text

log = logging.getLogger("olora")


@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes, relative to the project root (mirrored in dvc.yaml)."""

    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def params(self) -> Path:
        return self._p("params.yaml")

    @property
    def data(self) -> Path:
        return self._p("data/prepared")

    @property
    def init(self) -> Path:
        return self._p("models/init")

    @property
    def adapter(self) -> Path:
        return self._p("models/adapter")

    @property
    def exported(self) -> Path:
        return self._p("models/exported")

    @property
    def checkpoints(self) -> Path:
        return self._p("checkpoints/train")

    def metrics(self, name: str) -> Path:
        return self._p(f"metrics/{name}.json")

    def plot(self, name: str) -> Path:
        return self._p(f"plots/{name}.csv")

    @property
    def report(self) -> Path:
        return self._p("reports/eval.md")

    @property
    def registration(self) -> Path:
        return self._p("reports/registration.json")


def _setup(params: Path, overrides: dict[str, Any] | None):
    from olora.models import resolve_model
    from olora.runtime import resolve_runtime

    cfg = load_config(params, overrides)
    runtime = resolve_runtime(cfg.model)
    return cfg, resolve_model(cfg.model), runtime


def stage_prepare(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from olora.models import load_tokenizer, resolve_model
    from olora.prepare import prepare

    cfg = load_config(layout.params, overrides)
    result = prepare(cfg.data, load_tokenizer(resolve_model(cfg.model)), layout.data)
    write_json(layout.metrics("data"), result.stats)
    log.info("prepare: %s train / %s validation examples", result.stats["train_examples"], result.stats["validation_examples"])
    return result.stats


def stage_init(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from olora.initialize import initialise_adapter

    cfg, ref, runtime = _setup(layout.params, overrides)
    result = initialise_adapter(cfg, ref, runtime, layout.init)
    write_json(layout.metrics("init"), result.metrics)
    log.info("init: %s layers, max output diff %.3g", result.metrics["layers"], result.metrics["max_output_diff"])
    return result.metrics


def stage_train(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, callbacks=None) -> dict[str, Any]:
    from olora import tracking
    from olora.train import train_adapter

    cfg, ref, runtime = _setup(layout.params, overrides)
    callbacks = list(callbacks or [])
    run = None
    if cfg.tracking.enabled:
        run = tracking.start_training_run(cfg, layout.root, ref.name, ref.revision)
        batch_logger = tracking.BatchLogger(*run)
        callbacks.append(batch_logger.callback)
    try:
        result = train_adapter(
            cfg, ref, runtime, layout.data, layout.init, layout.adapter, layout.exported, layout.checkpoints, callbacks
        )
    except BaseException:
        if run:
            run[0].set_terminated(run[1], "FAILED")
        raise
    if run:
        result.metrics["tracking_seconds"] = round(batch_logger.seconds, 4)
        result.metrics["tracking_share_of_train_time"] = round(batch_logger.seconds / max(result.metrics["train_seconds"], 1e-9), 6)
        tracking.finish_training_run(*run, cfg, result.metrics, result.history, layout.exported, layout.adapter)
    _write_curve(layout.plot("train_loss"), [(h["step"], h["loss"]) for h in result.history if "loss" in h], "loss")
    _write_curve(
        layout.plot("val_loss"), [(h["step"], h["eval_loss"]) for h in result.history if "eval_loss" in h], "val_loss"
    )
    write_json(layout.metrics("train"), result.metrics)
    log.info("train: %s steps, final val loss %.4f", result.metrics["steps"], result.metrics["final_val_loss"])
    return result.metrics


def stage_evaluate(which: str, layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the untouched base (`which='base'`) or base + exported adapter (`which='adapter'`)."""
    from olora.evaluate import load_model_for_eval, report_markdown, run_lm_eval, with_deltas
    from olora.models import load_tokenizer

    if which not in ("base", "adapter"):
        raise ValueError(f"which must be 'base' or 'adapter', got {which!r}")
    cfg, ref, runtime = _setup(layout.params, overrides)
    _check_eval_tasks(cfg)
    model = load_model_for_eval(ref, runtime, layout.exported if which == "adapter" else None)
    metrics = run_lm_eval(model, load_tokenizer(ref), cfg.eval)
    if which == "adapter":
        base = read_json(layout.metrics("eval_base"))
        metrics = with_deltas(metrics, base)
        write_text(layout.report, report_markdown(base, metrics, f"{cfg.adapter.init} r={cfg.adapter.r} on {ref.name}"))
    write_json(layout.metrics(f"eval_{which}"), metrics)  # before logging: a tracking outage loses no scores
    if which == "adapter":
        _log_evaluation(cfg, layout, base, metrics)
    log.info("evaluate %s: mean acc %.4f", which, metrics["mean_acc"])
    return metrics


def _log_evaluation(cfg: Config, layout: Layout, base: dict[str, Any], tuned: dict[str, Any]) -> None:
    """Add base and fine-tuned scores (and differences) to the adapter's MLflow run, found via its DVC output."""
    from olora import tracking

    run = tracking.read_run_file(layout.adapter)
    if not cfg.tracking.enabled or run is None:
        return
    client = tracking.client(cfg.tracking, layout.root)
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
    tracking.with_retries("logging evaluation", client.tracking_uri, lambda: tracking.log_values(client, run["run_id"], values))
    client.log_artifact(run["run_id"], str(layout.report))


def stage_register(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the exported adapter in the MLflow Model Registry (alias `challenger`)."""
    from olora import registry, tracking

    cfg = load_config(layout.params, overrides)
    if not cfg.tracking.enabled:
        record: dict[str, Any] = {"registered": False, "reason": "tracking.enabled is false"}
    else:
        reg = registry.register(cfg, layout.root, layout.adapter, layout.exported, read_json(layout.metrics("eval_adapter")))
        record = {"registered": True, **registry.registration_record(reg, tracking.resolve_uri(cfg.tracking, layout.root))}
    write_json(layout.registration, record)
    return record


def _check_eval_tasks(cfg: Config) -> None:
    """Fail on unknown offline tasks before a model is loaded."""
    if cfg.eval.source == "offline":
        import tempfile

        from olora.evaluate import write_offline_tasks

        with tempfile.TemporaryDirectory() as folder:
            write_offline_tasks(cfg.eval.tasks, Path(folder))


def _write_curve(path: Path, points: list[tuple[int, float]], column: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", column])
        writer.writerows(points)
    tmp.replace(path)
