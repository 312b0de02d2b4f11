"""Pure decisions of the convergence study: learning-rate choice, curve aggregation, steps-to-reach, benchmark errors."""

from __future__ import annotations

import math

import pytest

from olora.core import study


def test_mean_se_matches_the_textbook_formula():
    mean, se = study.mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))
    assert math.isnan(study.mean_se([5.0])[1])
    with pytest.raises(ValueError):
        study.mean_se([])


def test_pick_learning_rate_prefers_lowest_finite_loss_and_smaller_rate_on_ties():
    assert study.pick_learning_rate({1e-4: 2.0, 3e-4: 1.5, 1e-3: math.inf}) == 3e-4
    assert study.pick_learning_rate({1e-3: 1.5, 1e-4: 1.5}) == 1e-4
    assert study.pick_learning_rate({1e-4: math.nan, 1e-3: 3.0}) == 1e-3
    with pytest.raises(ValueError, match="no learning rate"):
        study.pick_learning_rate({1e-3: math.inf})


def test_grid_extension_only_from_an_edge():
    grid = [1e-4, 3e-4, 1e-3]
    assert study.grid_extension(grid, 1e-3) == pytest.approx(3e-3)
    assert study.grid_extension(grid, 1e-4) == pytest.approx(1e-4 / 3)
    assert study.grid_extension(grid, 3e-4) is None
    assert study.grid_extension([1e-3], 1e-3) is None


def test_aggregate_curves_uses_only_common_steps():
    curves = [[(5, 2.0), (10, 1.0)], [(5, 4.0), (10, 3.0), (15, 0.5)]]
    out = study.aggregate_curves(curves)
    assert [s for s, _, _ in out] == [5, 10]
    assert out[0][1] == pytest.approx(3.0) and out[0][2] == pytest.approx(1.0)
    assert study.aggregate_curves([]) == []


def test_steps_to_reach_is_the_first_step_at_or_below_target():
    curve = [(10, 1.8), (5, 2.0), (15, 1.5)]
    assert study.steps_to_reach(curve, 1.8) == 10
    assert study.steps_to_reach(curve, 1.6) == 15
    assert study.steps_to_reach(curve, 1.0) is None


def test_benchmark_summary_separates_seed_and_sampling_error():
    seeds = [
        {"tasks": {"piqa": {"acc": 0.5, "acc_stderr": 0.1}, "boolq": {"acc": 0.7, "acc_stderr": 0.1}}},
        {"tasks": {"piqa": {"acc": 0.7, "acc_stderr": 0.1}, "boolq": {"acc": 0.7, "acc_stderr": 0.1}}},
    ]
    out = study.benchmark_summary(seeds)
    assert out["piqa"]["acc"] == pytest.approx(0.6)
    assert out["piqa"]["seed_se"] == pytest.approx(0.1)
    assert out["piqa"]["sampling_se"] == pytest.approx(0.1)
    assert out["boolq"]["seed_se"] == pytest.approx(0.0)
    assert out["mean"]["acc"] == pytest.approx(0.65)
    assert out["mean"]["sampling_se"] == pytest.approx(math.sqrt(0.02) / 2)
