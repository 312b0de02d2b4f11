"""The promotion gate is a pure function of the paired comparison: the gain's interval must clear the margin."""

import math

import pytest

from olora.core.paired import compare
from olora.core.promotion import decide


def table(values: list[int]) -> dict[str, dict[str, float]]:
    return {"boolq": {f"{i}:h{i}": float(v) for i, v in enumerate(values)}}


CHAMPION = [1] * 40 + [0] * 60  # accuracy 0.40


def challenger_with(extra_right: int) -> list[int]:
    return [1] * (40 + extra_right) + [0] * (60 - extra_right)


def test_no_champion_promotes():
    d = decide(0.41, None, None)
    assert d.promote and d.reason == "no champion yet"


def test_a_clear_gain_promotes_and_noise_does_not():
    clear = compare(table(CHAMPION), table(challenger_with(30)))  # +30 points, 30 discordant pairs one way
    d = decide(0.70, 0.40, clear)
    assert d.promote and "interval lies above register.min_improvement=0.0" in d.reason and d.comparison is clear
    noise = compare(table(CHAMPION), table(challenger_with(2)))  # +2 points on 100 questions
    d = decide(0.42, 0.40, noise)
    assert not d.promote and "not significant: the interval includes 0" in d.reason and "gain +2.0 points" in d.reason


def test_the_margin_is_applied_to_the_lower_bound():
    clear = compare(table(CHAMPION), table(challenger_with(30)))
    assert clear.low > 0.1
    assert decide(0.70, 0.40, clear, min_improvement=0.1).promote
    d = decide(0.70, 0.40, clear, min_improvement=clear.low + 0.01)
    assert not d.promote and "does not exceed register.min_improvement" in d.reason


def test_a_worse_challenger_is_kept_out():
    worse = compare(table(challenger_with(30)), table(CHAMPION))
    d = decide(0.40, 0.70, worse)
    assert not d.promote and "worse than the champion" in d.reason


def test_force_missing_metric_and_missing_comparison():
    d = decide(0.1, 0.9, None, force=True)
    assert d.promote and d.forced and d.reason == "forced by --force"
    d = decide(None, 0.4, None)
    assert not d.promote and "no finite mean_acc" in d.reason and math.isnan(d.challenger_metric)
    assert not decide(float("nan"), None, None).promote
    d = decide(0.5, 0.4, None)  # a champion but no comparison on the same questions: never on bare means
    assert not d.promote and "no paired comparison" in d.reason
    with pytest.raises(ValueError):
        decide(0.5, 0.4, None, min_improvement=-0.1)
