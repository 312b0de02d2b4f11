"""The sequential gate's maths: published boundaries, and by simulation (fixed seed) its error rate, power and cost."""

import math

import pytest

from olora.core import sequential as seq

# the paper's seven tasks at the validation sizes the embedded default ships (docs: ENVIRONMENT), stages [100, 400, 0]
SPLITS = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "hellaswag": 10042, "openbookqa": 500, "piqa": 1838,
          "winogrande": 1267}
SIZES = seq.planned_sizes([100, 400, 0], SPLITS)
EQUAL = {t: 1 / len(SPLITS) for t in SPLITS}
ALPHA = seq.false_promotion_rate(0.95)
RUNS = 10_000
TOLERANCE = 3 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)  # three binomial standard errors of a rate over RUNS decisions


def test_obrien_fleming_boundaries_match_the_published_ones():
    # Lan-DeMets O'Brien-Fleming spending, three equally spaced looks, one-sided 0.025 (Jennison & Turnbull 2000)
    assert seq.boundaries([1 / 3, 2 / 3, 1], 0.025) == pytest.approx([3.710, 2.511, 1.993], abs=0.005)
    assert seq.boundaries([1], 0.025) == pytest.approx([1.95996], abs=1e-4)  # one look: the fixed test
    assert seq.boundaries([1 / 3, 2 / 3, 1], 0.025, "bonferroni") == pytest.approx([2.394] * 3, abs=1e-3)
    pocock = seq.boundaries([1 / 3, 2 / 3, 1], 0.025, "pocock")
    assert max(pocock) - min(pocock) < 0.05 and pocock[0] < 2.4  # nearly flat: willing to stop early


def test_bad_designs_are_refused():
    with pytest.raises(ValueError, match="information fractions must increase"):
        seq.boundaries([0.5, 0.4, 1], 0.025)
    with pytest.raises(ValueError, match="rule must be one of"):
        seq.boundaries([1], 0.025, "haybittle")
    with pytest.raises(ValueError, match="must grow"):
        seq.information_fractions([{"a": 100}, {"a": 100}], {"a": 1.0})
    # a stage past every split adds nothing and is dropped
    assert seq.planned_sizes([100, 400, 0], {"a": 150}) == [{"a": 100}, {"a": 150}]


@pytest.mark.parametrize("rule", ["obrien-fleming", "pocock"])
def test_no_true_gain_promotes_at_the_nominal_rate(rule):
    """Under no true difference, 10,000 simulated decisions promote at (1 - confidence) / 2, the fixed gate's rate,
    within binomial tolerance, though the sequential gate looks three times."""
    sim = seq.simulate(SIZES, EQUAL, true_gain=0.0, rule=rule, runs=RUNS, seed=1)
    assert abs(sim.promoted_sequential - ALPHA) < TOLERANCE, sim
    assert abs(sim.promoted_fixed - ALPHA) < TOLERANCE, sim
    # looking three times at the fixed gate's own boundary would not keep it: the spending is what does
    naive = seq.decide_arrays(*seq.simulated_statistics(SIZES, EQUAL, 0.0, runs=RUNS, seed=1), [seq._N.inv_cdf(1 - ALPHA)] * 3, 0.0)[0].mean()
    assert naive > ALPHA + TOLERANCE


def test_a_true_gain_at_the_margin_is_a_null_too():
    sim = seq.simulate(SIZES, EQUAL, true_gain=0.01, margin=0.01, runs=RUNS, seed=2)
    assert abs(sim.promoted_sequential - ALPHA) < TOLERANCE, sim


def test_bonferroni_never_exceeds_the_nominal_rate():
    sim = seq.simulate(SIZES, EQUAL, true_gain=0.0, rule="bonferroni", runs=RUNS, seed=3)
    assert sim.promoted_sequential < ALPHA + TOLERANCE, sim


def test_power_under_a_one_point_gain_and_the_questions_it_costs():
    """A true 1-point gain: O'Brien-Fleming's gate promotes as often as the fixed gate at the largest set (the fixed
    test is the most powerful at its n and level, so "as often" is within half a point), and a 4-point gain is
    decided on about a fifth of the questions."""
    one = seq.simulate(SIZES, EQUAL, true_gain=0.01, runs=RUNS, seed=4)
    assert one.promoted_sequential >= one.promoted_fixed - 0.005, one
    assert one.questions_sequential <= one.questions_fixed
    four = seq.simulate(SIZES, EQUAL, true_gain=0.04, runs=RUNS, seed=5)
    assert four.promoted_sequential > 0.99 and four.questions_sequential < 0.25 * four.questions_fixed, four
    null = seq.simulate(SIZES, EQUAL, true_gain=0.0, runs=RUNS, seed=6)
    print(f"\nexpected questions per side (fixed gate: {one.questions_fixed}): no gain {null.questions_sequential:.0f}, "
          f"1 point {one.questions_sequential:.0f}, 4 points {four.questions_sequential:.0f}; power at 1 point "
          f"{one.promoted_sequential:.3f} (fixed {one.promoted_fixed:.3f})")


def test_a_look_reports_its_adjusted_interval():
    b = seq.boundaries([0.25, 1], ALPHA)
    first = seq.look(0.05, 0.01, b[0], 0.0, 700, last=False)
    assert first.outcome == "promote" and first.low == pytest.approx(0.05 - b[0] * 0.01)
    assert first.level == pytest.approx(1 - 2 * (1 - seq._N.cdf(b[0]))) and first.level > 0.99
    assert seq.look(0.01, 0.01, b[0], 0.0, 700, last=False).outcome == "continue"
    assert seq.look(-0.05, 0.01, b[0], 0.0, 700, last=False).outcome == "futile"
    assert seq.look(0.01, 0.01, b[1], 0.0, 2800, last=True).outcome == "keep"


def test_register_stages_are_checked():
    from olora.config import ConfigError, RegisterConfig

    RegisterConfig(stages=[100, 400, 0]).validate()
    for bad in ([400, 100], [0, 100], [100, 100], [-1, 0]):
        with pytest.raises(ConfigError, match=r"register.stages=.* must be questions per task that increase"):
            RegisterConfig(stages=bad).validate()
    with pytest.raises(ConfigError, match="register.spending"):
        RegisterConfig(spending="linear").validate()
