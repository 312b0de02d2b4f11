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
    from olora.train import train_adapter

    cfg, ref, runtime = _setup(layout.params, overrides)
    result = train_adapter(
        cfg, ref, runtime, layout.data, layout.init, layout.adapter, layout.exported, layout.checkpoints, callbacks
    )
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
    metrics = run_lm_eval(model, load_tokenizer(ref), cfg.eval, runtime)
    if which == "adapter":
        base = read_json(layout.metrics("eval_base"))
        metrics = with_deltas(metrics, base)
        write_text(layout.report, report_markdown(base, metrics, f"{cfg.adapter.init} r={cfg.adapter.r} on {ref.name}"))
    write_json(layout.metrics(f"eval_{which}"), metrics)
    log.info("evaluate %s: mean acc %.4f", which, metrics["mean_acc"])
    return metrics


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
