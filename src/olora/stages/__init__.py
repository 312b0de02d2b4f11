"""The pipeline's stage table: the one place a stage is declared.

Each entry names the stage, the library function that runs it, the parameters it reads, its data
inputs and its outputs. `dvc.yaml` is generated from this table (`olora dvc-yaml --write`, by
`olora.devtools`; a test fails when the committed file differs); the `olora` CLI and the Prefect
flows dispatch through it. A stage's code dependencies are not listed by hand: they are the project
modules its function can import (`olora.devtools.code_modules`), and a test checks them against
what a real run loads.

    prepare -> init -> train -> evaluate_base -> evaluate -> register
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from olora import layout as L
from olora.layout import Layout
from olora.stages.lock import stage_lock  # module level: every stage runs under it (and so depends on it)


@dataclass(frozen=True)
class Stage:
    name: str
    """Stage name in dvc.yaml, the CLI (`olora <cli>`) and the Prefect task run."""
    function: str
    """`module:function` called as function(layout, overrides) -> dict of metrics."""
    params: tuple[str, ...]
    """params.yaml keys or blocks it reads (so DVC reruns it exactly when one of them changes)."""
    inputs: tuple[str, ...] = ()
    """Data dependencies: other stages' outputs and the tracked input folders."""
    outs: tuple[str, ...] = ()
    """Cached outputs (DVC stores them in its cache and pushes them to the remote)."""
    metrics: tuple[str, ...] = ()
    plots: tuple[tuple[str, str, str], ...] = ()
    """(path, x, y) of CSV plots."""
    reports: tuple[str, ...] = ()
    """Uncached outputs committed to git (small reports)."""
    cli: tuple[str, ...] = ()
    """Arguments after `olora` (default: the stage name)."""
    help: str = ""
    """One line for `olora --help`."""
    tracked: bool = False
    """Whether it logs to MLflow: its function then takes `tracking=` (an `olora.tracking.client.Tracking`),
    which the flows resolve once per run and pass down."""

    @property
    def module(self) -> str:
        return self.function.split(":")[0]

    @property
    def cmd(self) -> str:
        return "olora " + " ".join(self.cli or (self.name,))

    def run(self, layout: Layout = Layout(), overrides: dict[str, Any] | None = None, **kwargs) -> dict[str, Any]:
        module, name = self.function.split(":")
        fn: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), name)
        with stage_lock(layout.root, self.name):
            return fn(layout, overrides, **kwargs)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prepare",
            "olora.stages.prepare:prepare",
            help="load, validate, render, dedupe and split the fine-tuning data",
            params=("model.name", "model.revision", "data"),
            inputs=(L.DATA_INPUTS, L.MODEL_INPUTS),
            outs=(L.DATA,),
            metrics=(L.metrics_path("data"),),
        ),
        Stage(
            "init",
            "olora.stages.init:init",
            help="initialise the adapter (adapter.init: OLoRA, LoRA or a PEFT sibling) and check the invariants",
            params=("model", "adapter", "data.max_seq_length"),
            inputs=(L.MODEL_INPUTS, L.DATA),  # the calibration sample of eva, corda and lora_ga
            outs=(L.INIT,),
            metrics=(L.metrics_path("init"),),
        ),
        Stage(
            "train",
            "olora.stages.train:train",
            tracked=True,
            help="fine-tune the adapter and export a plain LoRA",
            params=("model", "adapter", "data.max_seq_length", "train", "tracking.enabled", "tracking.uri", "tracking.experiment"),
            inputs=(L.MODEL_INPUTS, L.DATA, L.INIT),
            outs=(L.ADAPTER, L.EXPORTED),
            metrics=(L.metrics_path("train"),),
            plots=((L.plot_path("train_loss"), "step", "loss"), (L.plot_path("val_loss"), "step", "val_loss")),
        ),
        Stage(
            "evaluate_base",
            "olora.stages.evaluate:evaluate_base",
            help="lm-eval on the untouched base (every question's outcome kept)",
            params=("model", "evaluate"),
            inputs=(L.MODEL_INPUTS, L.EVALS),
            outs=(L.samples_path("base"),),
            metrics=(L.metrics_path("eval_base"),),
            cli=("evaluate", "base"),
        ),
        Stage(
            "evaluate",
            "olora.stages.evaluate:evaluate",
            tracked=True,
            help="lm-eval on base + exported adapter, paired with the base on the same questions",
            params=("model", "adapter", "evaluate", "register.confidence", "register.resamples"),
            inputs=(L.MODEL_INPUTS, L.EVALS, L.ADAPTER, L.EXPORTED, L.metrics_path("eval_base"), L.samples_path("base")),
            outs=(L.samples_path("adapter"),),
            metrics=(L.metrics_path("eval_adapter"),),
            reports=(L.REPORT,),
            cli=("evaluate", "adapter"),
        ),
        Stage(
            "register",
            "olora.stages.register:register",
            tracked=True,
            help="register the exported adapter in the MLflow Model Registry (alias challenger)",
            params=("model.name", "model.revision", "tracking", "register"),
            inputs=(L.ADAPTER, L.EXPORTED, L.metrics_path("eval_adapter")),
            reports=(L.REGISTRATION,),
        ),
    ]
}


def setup(layout: Layout, overrides: dict[str, Any] | None):
    """What every model stage starts with: the validated config, the base model reference, device/dtype."""
    from olora.config import load_config
    from olora.modeling.models import resolve_model
    from olora.modeling.runtime import resolve_runtime

    cfg = load_config(layout.params, overrides)
    ref = resolve_model(cfg.model, layout.root)
    return cfg, ref, resolve_runtime(cfg.model, cfg.runtime)
