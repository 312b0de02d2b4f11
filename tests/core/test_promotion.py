"""The promotion gate is a pure function of the two metrics."""

import math

import pytest

from olora.core.promotion import decide


def test_no_champion_promotes():
    d = decide(0.41, None)
    assert d.promote and d.reason == "no champion yet"


@pytest.mark.parametrize(
    "challenger, champion, margin, expected",
    [(0.45, 0.40, 0.0, True), (0.45, 0.40, 0.05, True), (0.45, 0.40, 0.06, False), (0.40, 0.40, 0.0, False), (0.39, 0.40, 0.0, False)],
)
def test_margin(challenger, champion, margin, expected):
    d = decide(challenger, champion, margin)
    assert d.promote is expected
    assert d.challenger_metric == challenger and d.champion_metric == champion
    assert ("beats" in d.reason) is expected


def test_force_and_missing_metric():
    assert decide(0.1, 0.9, force=True).promote
    d = decide(None, 0.4)
    assert not d.promote and "no finite mean_acc" in d.reason and math.isnan(d.challenger_metric)
    assert not decide(float("nan"), None).promote
    with pytest.raises(ValueError):
        decide(0.5, 0.4, min_improvement=-0.1)
