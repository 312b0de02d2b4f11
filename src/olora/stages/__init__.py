"""The pipeline's stage table: the one place a stage is declared.

Each entry names the stage, the library function that runs it, the parameters it reads, its data
inputs and its outputs. `dvc.yaml` is generated from this table (`olora dvc-yaml --write`; a test
fails when the committed file differs); the `olora` CLI and the Prefect flows dispatch through it.
A stage's code dependencies are not listed by hand: they are the project modules its function can
import (`olora.stages.code`), and a test checks them against what a real run loads.

    prepare -> init -> train -> evaluate_base -> evaluate -> register
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from olora import layout as L
from olora.layout import Layout
from olora.locking import stage_lock  # module level: every stage runs under it (and so depends on it)


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
            help="initialise the adapter with OLoRA (or LoRA) and check the invariants",
            params=("model", "adapter"),
            inputs=(L.MODEL_INPUTS,),
            outs=(L.INIT,),
            metrics=(L.metrics_path("init"),),
        ),
        Stage(
            "train",
            "olora.stages.train:train",
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
            help="lm-eval on the untouched base",
            params=("model", "evaluate"),
            inputs=(L.MODEL_INPUTS,),
            metrics=(L.metrics_path("eval_base"),),
            cli=("evaluate", "base"),
        ),
        Stage(
            "evaluate",
            "olora.stages.evaluate:evaluate",
            help="lm-eval on base + exported adapter",
            params=("model", "adapter", "evaluate"),
            inputs=(L.MODEL_INPUTS, L.ADAPTER, L.EXPORTED, L.metrics_path("eval_base")),
            metrics=(L.metrics_path("eval_adapter"),),
            reports=(L.REPORT,),
            cli=("evaluate", "adapter"),
        ),
        Stage(
            "register",
            "olora.stages.register:register",
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
    from olora.models import resolve_model
    from olora.runtime import resolve_runtime

    cfg = load_config(layout.params, overrides)
    ref = resolve_model(cfg.model, layout.root)
    return cfg, ref, resolve_runtime(cfg.model, cfg.runtime)


# ---------------------------------------------------------------- code dependencies and dvc.yaml

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/olora
ENTRY_MODULES = ("olora.cli", "olora.stages")  # what `olora <stage>` runs before the stage's own module


def _module_file(name: str) -> Path | None:
    rel = name.split(".")[1:]
    base = PACKAGE_ROOT.joinpath(*rel)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(name: str, module_level_only: bool = False) -> set[str]:
    """Project modules that `name` imports in its source: anywhere (inside functions too), or at module level."""
    import ast

    path = _module_file(name)
    if path is None:
        return set()
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "olora")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "olora":
                continue
            found.add(base)
            for alias in node.names:
                if _module_file(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return found


def code_modules(stage: Stage) -> list[str]:
    """Every project module the stage can execute.

    The CLI and this table contribute their module-level imports (their other commands' lazy
    imports never run for a stage); from there and from the stage's own module, every import,
    at module level or inside a function, is followed transitively.
    """
    todo = [stage.module, *ENTRY_MODULES]
    for entry in ENTRY_MODULES:
        todo.extend(_imports(entry, module_level_only=True))
    seen: set[str] = set(ENTRY_MODULES)
    todo = [m for m in todo if m not in ENTRY_MODULES]
    todo.append("olora")
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run their __init__
        todo.extend(_imports(name))
    return sorted(seen)


def code_files(stage: Stage) -> list[str]:
    """The stage's code dependencies as project-relative paths, `src/olora/...` (what dvc.yaml lists under deps)."""
    project = PACKAGE_ROOT.parents[1]
    return sorted(str(_module_file(m).relative_to(project)) for m in code_modules(stage))


def dvc_yaml() -> str:
    """dvc.yaml as generated from the table (deterministic text)."""
    import yaml

    stages: dict[str, Any] = {}
    for stage in STAGES.values():
        entry: dict[str, Any] = {"cmd": stage.cmd}
        entry["deps"] = [*code_files(stage), L.LOCKFILE, *stage.inputs]
        entry["params"] = list(stage.params)
        if stage.outs:
            entry["outs"] = list(stage.outs)
        outs_uncached = [{path: {"cache": False}} for path in stage.reports]
        if outs_uncached:
            entry.setdefault("outs", []).extend(outs_uncached)
        if stage.metrics:
            entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
        if stage.plots:
            entry["plots"] = [{path: {"cache": False, "x": x, "y": y}} for path, x, y in stage.plots]
        stages[stage.name] = entry
    header = (
        "# Generated from the stage table in src/olora/stages/__init__.py by `olora dvc-yaml --write`; do not edit.\n"
        "# Each cmd is a thin caller of a library function; deps are every project module the stage can run\n"
        "# (its import closure), the locked library versions and its data inputs; params are only the keys it reads.\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000)
