"""Invariants of the paired comparison (olora.core.paired): exact differences, intervals that cover, weights."""

from __future__ import annotations

import numpy as np
import math

import pytest

from olora.core.paired import compare, mcnemar_exact

TASKS = ["arc_easy", "boolq", "piqa"]


def table(scores: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    return {task: {f"{i}:h{i}": float(v) for i, v in enumerate(values)} for task, values in scores.items()}


def random_scores(rng, n=60, p=0.5) -> dict[str, list[int]]:
    return {t: list((rng.random(n) < p).astype(int)) for t in TASKS}


def test_identical_tables_differ_by_zero_with_zero_inside():
    scores = random_scores(np.random.default_rng(0))
    c = compare(table(scores), table(scores))
    assert c.diff == 0 and c.low <= 0 <= c.high and not c.significant
    assert all(t.diff == 0 and t.p_value == 1.0 and t.better == t.worse == 0 for t in c.tasks.values())
    assert c.n == 3 * 60 and c.mde > 0  # no discordant pair: a conservative bound, never a perfect instrument


def test_flipping_k_known_answers_gives_exactly_the_expected_difference():
    rng = np.random.default_rng(1)
    champion = random_scores(rng, n=50)
    challenger = {t: list(v) for t, v in champion.items()}
    wrong = [i for i, v in enumerate(champion["boolq"]) if v == 0][:7]
    right = [i for i, v in enumerate(champion["piqa"]) if v == 1][:3]
    for i in wrong:
        challenger["boolq"][i] = 1
    for i in right:
        challenger["piqa"][i] = 0
    c = compare(table(champion), table(challenger))
    assert c.tasks["boolq"].diff == pytest.approx(7 / 50) and c.tasks["boolq"].better == 7 and c.tasks["boolq"].worse == 0
    assert c.tasks["piqa"].diff == pytest.approx(-3 / 50) and c.tasks["piqa"].worse == 3
    assert c.tasks["arc_easy"].diff == 0
    assert c.diff == pytest.approx((7 / 50 - 3 / 50) / 3)  # the mean over tasks of each task's difference
    assert c.tasks["boolq"].p_value == pytest.approx(2 * 0.5**7)  # exact McNemar: all 7 discordant pairs one way


def test_the_interval_covers_a_known_true_difference_at_its_confidence():
    """Simulated pairs with true accuracies 0.55 vs 0.50 (correlated answers); the 95 % interval covers 0.05."""
    rng = np.random.default_rng(2)
    covered, repetitions, n = 0, 400, 200
    for rep in range(repetitions):
        champion, challenger = {}, {}
        for t in TASKS:
            shared = rng.random(n)  # the question's difficulty, seen by both models (what makes pairing pay)
            champion[t] = list((shared < 0.50).astype(int))
            flip = rng.random(n) < 0.1  # on a tenth of the questions the challenger draws afresh
            fresh = (rng.random(n) < 0.55).astype(int)
            base = (shared < 0.55).astype(int)
            challenger[t] = list(np.where(flip, fresh, base))
        c = compare(table(champion), table(challenger), resamples=2000, seed=rep)
        covered += c.low <= 0.05 <= c.high
    assert 0.93 * repetitions <= covered <= 0.97 * repetitions, covered / repetitions


def test_tasks_weigh_equally_whatever_their_size():
    small = {"a": [0] * 10, "b": [0] * 1000}
    better_small = {"a": [1] * 5 + [0] * 5, "b": [0] * 1000}
    c = compare(table(small), table(better_small))
    assert c.diff == pytest.approx(0.5 / 2)  # +50 points on the 10-question task, halved by the mean over two tasks
    assert c.tasks["a"].n == 10 and c.tasks["b"].n == 1000 and c.n == 1010


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_seeded_and_reproducible():
    rng = np.random.default_rng(3)
    a, b = table(random_scores(rng)), table(random_scores(rng))
    assert compare(a, b, seed=7) == compare(a, b, seed=7)


@pytest.mark.parametrize("kwargs, message", [
    ({"confidence": 0.5}, "confidence must lie in"), ({"confidence": 1.0}, "confidence must lie in"),
    ({"resamples": 999}, "at least 1000 bootstrap resamples"),
])
def test_bad_settings_are_refused(kwargs, message):
    scores = table({"a": [0, 1]})
    with pytest.raises(ValueError, match=message):
        compare(scores, scores, **kwargs)


def test_tables_of_other_questions_are_refused():
    with pytest.raises(ValueError, match="different tasks"):
        compare(table({"a": [1]}), table({"b": [1]}))
    with pytest.raises(ValueError, match="task a: the tables hold different questions"):
        compare(table({"a": [1, 0]}), table({"a": [1]}))
    with pytest.raises(ValueError, match="scores must be 0 or 1"):
        compare(table({"a": [1, 0]}), {"a": {"0:h0": 0.5, "1:h1": 1.0}})


def test_no_float_dust_in_a_zero_difference():
    """Seven tasks whose differences cancel: the mean is exactly 0 and prints as +0.0, never -0.0."""
    champion = {f"t{i}": [1, 0, 0] for i in range(7)}
    challenger = {f"t{i}": ([0, 1, 0] if i % 2 else [1, 0, 0]) for i in range(7)}
    c = compare(table(champion), table(challenger))
    assert c.diff == 0.0 and "gain +0.0 points" in c.summary()


# --- a metric over one task or a weighted set of tasks (register.promote_metric) ---------------------


def _flipped(rng, n=80):
    champion = random_scores(rng, n=n)
    challenger = {t: [1 - v if rng.random() < (0.3 if t == "boolq" else 0.1) else v for v in vs] for t, vs in champion.items()}
    return table(champion), table(challenger)


def test_one_task_is_that_tasks_comparison():
    a, b = _flipped(np.random.default_rng(4))
    c = compare(a, b, weights={"boolq": 1.0})
    t = c.tasks["boolq"]
    assert (c.diff, c.low, c.high, c.n) == (t.diff, t.low, t.high, t.n)  # the same resamples, weight 1
    assert c.mde == pytest.approx(t.mde) and c.weights == {"boolq": 1.0}
    assert set(c.tasks) == set(TASKS)  # the tasks it does not weigh keep their own comparison
    assert c.champion_score == pytest.approx(np.mean(list(a["boolq"].values())))
    assert c.challenger_score == pytest.approx(np.mean(list(b["boolq"].values())))


def test_a_weighted_set_weighs_difference_interval_and_power_as_the_metric():
    a, b = _flipped(np.random.default_rng(5))
    c = compare(a, b, weights={"arc_easy": 1, "boolq": 2})
    w = {"arc_easy": 1 / 3, "boolq": 2 / 3}
    assert c.weights == pytest.approx(w) and c.n == 160
    assert c.diff == pytest.approx(w["arc_easy"] * c.tasks["arc_easy"].diff + w["boolq"] * c.tasks["boolq"].diff)
    means = {side: {t: np.mean(list(x[t].values())) for t in w} for side, x in (("a", a), ("b", b))}
    assert c.champion_score == pytest.approx(sum(w[t] * means["a"][t] for t in w))
    assert c.challenger_score - c.champion_score == pytest.approx(c.diff)
    assert c.low <= c.diff <= c.high
    # the strata combine with the metric's weights: the interval is the quantile of the weighted resampled means
    rng = np.random.default_rng(0)
    draws = {}
    for task in sorted(a):  # compare's own order of draws
        keys = sorted(a[task])
        d = np.array([b[task][k] - a[task][k] for k in keys])
        counts = np.array([(d == v).sum() for v in (-1, 0, 1)])
        draws[task] = rng.multinomial(len(d), counts / len(d), size=10_000) @ np.array([-1.0, 0.0, 1.0]) / len(d)
    low, high = np.quantile(w["arc_easy"] * draws["arc_easy"] + w["boolq"] * draws["boolq"], [0.025, 0.975])
    assert (c.low, c.high) == (pytest.approx(low), pytest.approx(high))
    # the MDE of a weighted mean: z * sqrt(sum w_t^2 var_t / n_t), from the per-task MDEs (z * sqrt(var_t / n_t))
    assert c.mde == pytest.approx(np.sqrt(sum((w[t] * c.tasks[t].mde) ** 2 for t in w)))
    # a task counted twice as heavily moves the difference towards its own
    heavier = compare(a, b, weights={"arc_easy": 1, "boolq": 10})
    assert abs(heavier.diff - c.tasks["boolq"].diff) < abs(c.diff - c.tasks["boolq"].diff)


def test_equal_weights_are_the_plain_mean_over_tasks():
    a, b = _flipped(np.random.default_rng(6))
    plain, weighted = compare(a, b), compare(a, b, weights={t: 1 for t in TASKS})
    assert (weighted.diff, weighted.low, weighted.high, weighted.mde) == pytest.approx(
        (plain.diff, plain.low, plain.high, plain.mde))
    assert plain.weights is None and plain.champion_score == pytest.approx(weighted.champion_score)


def test_weights_naming_tasks_the_tables_lack_are_refused():
    a, b = _flipped(np.random.default_rng(7))
    with pytest.raises(ValueError, match=r"weighs task\(s\) \['copa_example'\] that the results do not hold"):
        compare(a, b, weights={"copa_example": 1})


@pytest.mark.parametrize("metric, weights", [
    ("mean_acc", None), ("mean_acc_norm", None), ("copa_example", {"copa_example": 1.0}),
    ("arc_easy:1+copa_example:2", {"arc_easy": 1.0, "copa_example": 2.0}),
    (" arc_easy + copa_example:0.5 ", {"arc_easy": 1.0, "copa_example": 0.5}),
])
def test_promote_metric_names_its_weights(metric, weights):
    from olora.config import config_from_dict

    cfg = config_from_dict({"evaluate": {"tasks": ["arc_easy", "copa_example"]}, "register": {"promote_metric": metric}})
    assert cfg.register.metric_weights() == weights


@pytest.mark.parametrize("metric, message", [
    ("copa_example:0", "the weight of copa_example must be a number > 0, got '0'"),
    ("arc_easy:1,copa_example:2", "the weight of arc_easy must be a number > 0, got '1,copa_example:2'"),
    ("arc_easy+arc_easy:2", "names arc_easy twice"),
    ("mean acc", "is not allowed; choose mean_acc, mean_acc_norm, one task of evaluate.tasks"),
    ("boolq", r"names task\(s\) \['boolq'\] that evaluate.tasks does not list \(arc_easy, copa_example\)"),
])
def test_bad_promote_metrics_are_refused(metric, message):
    from olora.config import config_from_dict
    from olora.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"evaluate": {"tasks": ["arc_easy", "copa_example"]}, "register": {"promote_metric": metric}})


def test_plan_finds_the_questions_a_target_needs():
    from olora.core.paired import plan

    var = {"a": 0.2, "b": 0.2}
    p = plan(var, {"a": 10_000, "b": 10_000}, 0.02)
    z = 1.959964 + 0.841621
    # equal splits: mean_acc's se is sqrt(0.2 / n) / sqrt(2), so n = z^2 * 0.1 / 0.02^2, rounded up
    assert p.per_task == math.ceil(z * z * 0.1 / 0.02 ** 2) and p.reached <= 0.02 and p.questions == 2 * p.per_task
    # a small split caps its task: mean_acc needs more of the other, and the whole splits may fall short
    capped = plan(var, {"a": 300, "b": 10_000}, 0.02)
    assert capped.per_task is None and capped.reached == capped.whole > 0.02
    pooled = plan(var, {"a": 300, "b": 10_000}, 0.02, pooled=True)  # question-weighted: the big task carries it
    assert pooled.per_task is not None and pooled.reached <= 0.02 < pooled.whole * 10
    with pytest.raises(ValueError, match="must be a number > 0"):
        plan(var, {"a": 1, "b": 1}, 0.0)
