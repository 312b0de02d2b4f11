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


def test_t_interval_and_band_use_student_t_over_seeds():
    mean, low, high = study.t_interval([1.0, 3.0])
    assert mean == 2.0 and (low, high) == pytest.approx((2.0 - 12.7062 * 1.0, 2.0 + 12.7062 * 1.0), rel=1e-4)  # t(0.975, 1) = 12.706
    assert all(math.isnan(x) for x in study.t_interval([4.0])[1:])
    band = study.band([[(1, 2.0), (2, 1.0), (3, 0.5)], [(1, 4.0), (2, 3.0)]])
    assert [b[0] for b in band] == [1, 2] and band[0][1] == 3.0 and band[0][2] < 3.0 < band[0][3]


def test_steps_to_target_is_the_slowest_methods_final_mean_and_names_unreached_seeds():
    curves = {"slow": [[(10, 3.0), (20, 2.0)], [(10, 3.0), (20, 2.2)]],
              "fast": [[(10, 2.0), (20, 1.0)], [(10, 2.2), (20, 1.5)], ]}
    target, steps = study.steps_to_target(curves)
    assert target == pytest.approx(2.1)
    assert steps["fast"]["steps"] == [10, 20] and steps["fast"]["mean"] == 15.0 and steps["fast"]["low"] < 15.0
    assert steps["slow"]["steps"] == [20, None] and steps["slow"]["reached"] == 1 and steps["slow"]["censored"]
    assert steps["slow"]["mean"] == 20.0 and not steps["fast"]["censored"]  # the unreached seed counted at its last step
    with pytest.raises(ValueError):
        study.steps_to_target({"a": []})


def test_holm_adjusts_step_down_and_levels_relax_from_bonferroni():
    out = study.holm({("a", "b"): 0.01, ("a", "c"): 0.04, ("b", "c"): 0.03}, alpha=0.05)
    assert out[("a", "b")]["p_holm"] == pytest.approx(0.03) and out[("a", "b")]["confidence"] == pytest.approx(1 - 0.05 / 3)
    assert out[("b", "c")]["p_holm"] == pytest.approx(0.06) and out[("b", "c")]["confidence"] == pytest.approx(1 - 0.05 / 2)
    assert out[("a", "c")]["p_holm"] == pytest.approx(0.06) and out[("a", "c")]["confidence"] == pytest.approx(0.95)  # monotone
    assert study.holm({"x": 0.9, "y": 0.8})["x"]["p_holm"] == 1.0  # capped at 1, never below an earlier step
    assert study.method_pairs(["olora", "lora", "pissa"]) == [("olora", "lora"), ("olora", "pissa"), ("lora", "pissa")]


def test_stack_seeds_keeps_each_seeds_questions_apart_and_pruner_minimum():
    table = study.stack_seeds({1: {"arc": {"q1": 1, "q2": 0}}, 0: {"arc": {"q1": 0}}})
    assert table == {"arc": {"s0:q1": 0, "s1:q1": 1, "s1:q2": 0}}
    assert study.pruner_minimum_trials(2) == 3
