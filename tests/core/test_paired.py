"""Invariants of the paired comparison (olora.core.paired): exact differences, intervals that cover, weights."""

from __future__ import annotations

import numpy as np
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
