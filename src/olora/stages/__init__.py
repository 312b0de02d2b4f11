"""The pipeline's stage table: the one place a stage is declared.

Each entry names the stage, the library function that runs it, the parameters it reads, its data
inputs and its outputs. `dvc.yaml` is generated from this table (`olora dvc-yaml --write`, by
`olora.devtools`; a test fails when the committed file differs); the `olora` CLI and the Prefect
flows dispatch through it. Each dvc.yaml command starts the stage's own module
(`python -m olora.stages.train`, through `olora.stages.entry`), so a stage's code dependencies are
this package, the entry and what the stage's module can import (`olora.devtools.code_modules`); a
test checks them against what a real run loads. What only the CLI needs (the commands' help texts)
lives in `olora.cliargs`, so editing it reruns no stage.

    prepare -> init -> train -> evaluate_base -> evaluate -> register
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
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
    tracked: bool = False
    """Whether it logs to MLflow: its function then takes `tracking=` (an `olora.tracking.client.Tracking`),
    which the flows resolve once per run and pass down."""

    @property
    def module(self) -> str:
        return self.function.split(":")[0]

    @property
    def cmd(self) -> str:
        """dvc.yaml's command: the stage's own module (`olora.stages.entry`), not the `olora` dispatcher."""
        return f"python -m {self.module}"

    def run(self, layout: Layout = Layout(), overrides: dict[str, Any] | None = None, **kwargs) -> Any:
        """The stage function's result: its record (a JSON dict), or for the evaluate stages their `EvalResult`."""
        module, name = self.function.split(":")
        fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
        with stage_lock(layout.root, self.name):
            return fn(layout, overrides, **kwargs)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prepare",
            "olora.stages.prepare:prepare",
            params=("model.name", "model.revision", "data"),
            inputs=(L.DATA_INPUTS, L.MODEL_INPUTS),
            outs=(L.DATA,),
            metrics=(L.metrics_path("data"),),
        ),
        Stage(
            "init",
            "olora.stages.init:init",
            params=("model", "adapter", "data.max_seq_length"),
            inputs=(L.MODEL_INPUTS, L.DATA),  # the calibration sample of eva, corda and lora_ga
            outs=(L.INIT,),
            metrics=(L.metrics_path("init"),),
        ),
        Stage(
            "train",
            "olora.stages.train:train",
            tracked=True,
            params=("model", "adapter", "data.max_seq_length", "train", "tracking.enabled", "tracking.uri", "tracking.experiment"),
            inputs=(L.MODEL_INPUTS, L.DATA, L.INIT),
            outs=(L.ADAPTER, L.EXPORTED),
            metrics=(L.metrics_path("train"),),
            plots=((L.plot_path("train_loss"), "step", "loss"), (L.plot_path("val_loss"), "step", "val_loss")),
        ),
        Stage(
            "evaluate_base",
            "olora.stages.evaluate_base:evaluate_base",
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
            params=("model.name", "model.revision", "tracking", "register"),
            inputs=(L.ADAPTER, L.EXPORTED, L.metrics_path("eval_adapter")),
            reports=(L.REGISTRATION,),
        ),
    ]
}


def setup(layout: Layout, overrides: dict[str, Any] | None, preflight: Callable[..., None] | None = None):
    """What every model stage starts with: the validated config, its `preflight` checks (the stage module's, which
    `olora check` runs too), the base model reference, device/dtype."""
    from olora.config import load_config
    from olora.modeling.models import resolve_model
    from olora.modeling.runtime import resolve_runtime

    cfg = load_config(layout.params, overrides)
    if preflight is not None:
        preflight(cfg, layout.root)
    ref = resolve_model(cfg.model, layout.root)
    return cfg, ref, resolve_runtime(cfg.model, cfg.runtime)


def base_model(cfg, root, present: bool = True):
    """The base model's reference for a pre-flight check (an embedded model is not converted: its config is read
    from the GGUF file); None where `present` is False and a local folder under models/base/ is not here yet (a
    deploying checkout whose run pulls it from the DVC remote): the checks that need its config are then skipped."""
    from olora.modeling.models import resolve_model

    if not present and cfg.model.name.startswith(L.MODEL_INPUTS) and not (Path(root) / cfg.model.name).exists():
        return None
    return resolve_model(cfg.model, root, convert=False)


def preflight(cfg, root, present: bool = True) -> None:
    """Every stage's pre-flight checks that need no weights (each stage module's `preflight`, which the stage
    itself runs first), in pipeline order: what `olora check` and the flows run before any work.

    Raises the stage's own error when one refusal is found (the same message the stage gives), else one
    OloraError listing each distinct refusal with its stage. `present=False`: a deploying checkout,
    whose data files the run's workspace pulls from the DVC remote, need not hold them.
    """
    from olora.errors import OloraError

    found: list[tuple[str, OloraError]] = []
    for module in dict.fromkeys(stage.module for stage in STAGES.values()):  # evaluate reuses evaluate_base's checks
        check = getattr(importlib.import_module(module), "preflight", None)
        if check is None:
            continue
        try:
            check(cfg, root, present)
        except OloraError as exc:
            if all(str(exc) != str(seen) for _, seen in found):
                found.append((module.rsplit(".", 1)[1], exc))
    if len(found) == 1:
        raise found[0][1]
    if found:
        raise OloraError(f"{len(found)} settings would be refused:\n" + "\n".join(f"  {stage}: {exc}" for stage, exc in found))
