"""The gate's comparison set and metric, without a registry: the whole set, never a smaller one; pooled_acc."""

from __future__ import annotations

import pytest

from olora.config import Config, EvaluateConfig
from olora.evaluation import samples
from olora.tracking import gate


def asked(tasks: dict[str, int], limit: int, **settings) -> dict:
    rows = [{"task": t, "doc_id": i, "doc_hash": f"{t}{i}", "acc": 1, "acc_norm": None} for t, n in tasks.items()
            for i in range(n)]
    cfg = EvaluateConfig(tasks=sorted(tasks), limit=limit, **settings)
    return samples.fingerprint(rows, cfg, {t: 1.0 for t in tasks})


def test_the_comparison_set_is_the_union_at_the_larger_limit():
    cfg = Config()
    champion = asked({t: 100 for t in ("arc_easy", "boolq", "piqa")}, 100)
    challenger = asked({"arc_easy": 20, "boolq": 20}, 20)
    target = gate.comparison_set(cfg, challenger, champion)
    assert target["tasks"] == ["arc_easy", "boolq", "piqa"] and target["limit"] == 100
    assert gate._covers((None, challenger), target) == ["tasks ['arc_easy', 'boolq'] vs ['arc_easy', 'boolq', 'piqa']",
                                                        "evaluate.limit 20 vs 100"]
    assert gate._covers((None, champion), target) == []
    whole = asked({t: 100 for t in ("arc_easy", "boolq", "piqa")}, 0)
    assert gate.comparison_set(cfg, whole, champion)["limit"] == 0  # the whole split is the largest
    assert gate._covers((None, whole), target) == []  # a larger set holds the smaller one (its first questions)
    assert gate._covers((None, asked({"arc_easy": 1, "boolq": 1, "piqa": 1}, 100, num_fewshot=5)), target) == [
        "evaluate.num_fewshot 5 vs 0"]
    cfg.register.promote_metric = "piqa:2+boolq"  # a weighted metric's set is its tasks
    assert gate.comparison_set(cfg, challenger, champion)["tasks"] == ["boolq", "piqa"]
    assert gate.question_set(target, 300, {"1": 300}) == "300 questions of 3 tasks (limit 100 a task); v1 re-scored on 300"


def test_pooled_acc_weighs_every_question_the_same():
    def rows(task_acc: dict[str, list[int]]) -> list[dict]:
        return [{"task": t, "doc_id": i, "doc_hash": f"{t}{i}", "acc": a, "acc_norm": None}
                for t, accs in task_acc.items() for i, a in enumerate(accs)]

    champion = rows({"big": [0] * 90, "small": [0] * 10})
    challenger = rows({"big": [0] * 90, "small": [1] * 10})  # right on every question of the small task only
    cfg = Config()
    assert gate._compare(cfg, champion, challenger).diff == pytest.approx(0.5)  # mean_acc: the tasks weigh the same
    cfg.register.promote_metric = "pooled_acc"
    pooled = gate._compare(cfg, champion, challenger)
    assert pooled.diff == pytest.approx(0.1) and pooled.weights == {"big": 0.9, "small": 0.1}
    assert pooled.challenger_score == pytest.approx(0.1) and pooled.n == 100
