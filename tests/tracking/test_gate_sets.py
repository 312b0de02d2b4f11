"""The gate's comparison set and metric, without a registry: the whole set, never a smaller one; pooled_acc."""

from __future__ import annotations

from dataclasses import replace

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


def test_a_side_holding_each_tasks_first_questions_is_scored_only_on_the_rest():
    """`rescore.extendable`: the questions a zero-shot side lacks of a larger set, per task up to its split; the
    whole set when its questions are not each task's first, its settings differ, or the set is few-shot."""
    from olora.tracking.rescore import extendable, merged_result

    def held(tasks: dict[str, int], limit: int, **settings):
        rows = [{"task": t, "doc_id": i, "doc_hash": f"{t}{i}", "acc": i % 2, "acc_norm": None} for t, n in tasks.items()
                for i in range(n)]
        return rows, asked(tasks, limit, **settings)

    splits = {"arc_challenge": 299, "boolq": 3270}
    side = held({"arc_challenge": 100, "boolq": 100}, 100)
    target = {"tasks": ["arc_challenge", "boolq"], "limit": 400, "num_fewshot": 0, "seed": 1234, "source": "offline"}
    missing = extendable(side, target, splits)
    assert missing == {"arc_challenge": list(range(100, 299)), "boolq": list(range(100, 400))}
    assert extendable(side, {**target, "limit": 0}, splits)["boolq"] == list(range(100, 3270))  # 0: the whole split
    at_400 = held({"arc_challenge": 299, "boolq": 400}, 400)
    assert extendable(at_400, {**target, "limit": 0}, splits) == {"boolq": list(range(400, 3270))}  # arc has all
    assert extendable(side, {**target, "limit": 100}, splits) is None  # nothing lacked
    assert extendable(side, {**target, "num_fewshot": 5}, splits) is None  # few-shot: scored whole
    assert extendable(side, {**target, "seed": 1}, splits) is None
    assert extendable(side, {**target, "tasks": ["arc_challenge", "boolq", "piqa"]}, {**splits, "piqa": 1838}) is None
    gap = ([r for r in side[0] if r["doc_id"] != 7], side[1])
    assert extendable(gap, target, splits) is None  # not each task's first questions
    assert extendable(held({"arc_challenge": 100, "boolq": 100}, 0), target, splits) is None  # the whole split holds all

    # the union is one evaluation of the set: its scores over all its questions, its fingerprint the full run's
    from olora.evaluation.harness import Evaluation
    from olora.evaluation.result import TaskScore, Timing, summary

    new_rows = [{"task": t, "doc_id": i, "doc_hash": f"{t}{i}", "acc": 1, "acc_norm": None} for t, ids in missing.items()
                for i in ids]
    new = Evaluation(replace(summary({t: TaskScore(n=len(ids), split="validation", acc=1.0) for t, ids in missing.items()},
                                     None), timing=Timing(len(new_rows), 2.0)), new_rows)
    rows, result = merged_result(side, new, {**target}, {"arc_challenge": "test", "boolq": "validation"})
    assert [(r["task"], r["doc_id"]) for r in rows] == sorted((r["task"], r["doc_id"]) for r in side[0] + new_rows)
    assert result.tasks["boolq"].n == 400 and result.tasks["boolq"].acc == pytest.approx((50 + 300) / 400)
    assert result.tasks["arc_challenge"].split == "test" and result.timing.requests == len(new_rows)
    whole = samples.fingerprint(rows, EvaluateConfig(tasks=["arc_challenge", "boolq"], limit=400), {t: 1.0 for t in splits})
    assert result.questions == whole  # as if the 400 a task had been scored in one run
    samples.check_matches(rows, result.questions, "merged")
