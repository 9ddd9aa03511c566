"""Calibration against Opacus, and monotonicity properties (hypothesis)."""

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accountants import (
    PoissonSampled,
    Gaussian,
    PrivacyParameterError,
    PrivacyWarning,
    RDPAccountant,
    noise_multiplier_for,
    sampling_plan,
    step_event,
    steps_for,
)
from accountants.checks import warn_if_delta_too_large


def _epsilon(q, sigma, steps, delta=1e-5, mechanism="gaussian"):
    accountant = RDPAccountant()
    accountant.compose(step_event(q, sigma, mechanism), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.004, 2000), (3.0, 0.01, 10_000), (8.0, 0.05, 600), (0.5, 1.0, 10)])
def test_noise_multiplier_is_guaranteed_and_tight(target, q, steps):
    sigma = noise_multiplier_for(target, 1e-5, q, steps, accountant="rdp")
    assert _epsilon(q, sigma, steps) <= target
    assert _epsilon(q, sigma * (1 - 2e-4), steps) > target  # no much smaller σ would do


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.004, 2000), (3.0, 0.01, 10_000), (8.0, 0.05, 600)])
def test_noise_multiplier_agrees_with_opacus(target, q, steps):
    from opacus.accountants.utils import get_noise_multiplier

    theirs = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp", epsilon_tolerance=0.001
    )
    ours = noise_multiplier_for(target, 1e-5, q, steps, accountant="rdp")
    assert ours == pytest.approx(theirs, rel=5e-3)  # Opacus stops within 0.001 in ε of the target


def test_laplace_calibration_meets_target():
    sigma = noise_multiplier_for(2.0, 1e-5, 0.01, 500, mechanism="laplace", accountant="rdp")
    assert _epsilon(0.01, sigma, 500, mechanism="laplace") <= 2.0
    assert _epsilon(0.01, sigma * 0.999, 500, mechanism="laplace") > 2.0


@pytest.mark.parametrize("target, q, sigma", [(3.0, 0.01, 1.0), (1.0, 0.001, 0.8), (8.0, 0.1, 2.0)])
def test_steps_for_is_the_largest_fitting_count(target, q, sigma):
    steps = steps_for(target, 1e-5, q, sigma, accountant="rdp")
    assert steps > 0
    assert _epsilon(q, sigma, steps) <= target < _epsilon(q, sigma, steps + 1)


def test_steps_for_returns_zero_when_nothing_fits():
    assert steps_for(0.01, 1e-5, 1.0, 0.5) == 0


def test_unreachable_target_is_reported():
    with pytest.raises(PrivacyParameterError, match="unreachable"):
        noise_multiplier_for(1e-4, 1e-12, 1.0, 10**6)


def test_sampling_plan():
    plan = sampling_plan(60_000, 256, 10)
    assert plan.sample_rate == 256 / 60_000
    assert plan.steps == 10 * math.ceil(60_000 / 256)  # an epoch is ⌈N/B⌉ steps
    assert sampling_plan(1000, 100, 3).steps == 30  # no spurious rounding up on exact products
    assert sampling_plan(1000, 300, 0.5).steps == 2
    with pytest.raises(PrivacyParameterError, match="batch_size"):
        sampling_plan(100, 200, 1)
    with pytest.raises(PrivacyParameterError, match="dataset_size"):
        sampling_plan(0, 1, 1)


def test_delta_above_one_over_n_warns():
    with pytest.warns(PrivacyWarning, match="1/dataset_size"):
        warn_if_delta_too_large(0.01, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_delta_too_large(1e-5, 1000)


@pytest.mark.parametrize(
    "call",
    [
        lambda: noise_multiplier_for(0.0, 1e-5, 0.01, 100),
        lambda: noise_multiplier_for(-1.0, 1e-5, 0.01, 100),
        lambda: noise_multiplier_for(float("inf"), 1e-5, 0.01, 100),
        lambda: noise_multiplier_for(1.0, 1e-5, 0.01, 100.5),
        lambda: noise_multiplier_for(1.0, 1e-5, 0.01, 0),
        lambda: noise_multiplier_for(1.0, 1e-5, 0.01, 100, mechanism="cauchy"),
        lambda: steps_for(1.0, 1e-5, 0.01, 0.0),
        lambda: steps_for(1.0, 0.0, 0.01, 1.0),
    ],
)
def test_calibration_rejects_bad_input(call):
    with pytest.raises(PrivacyParameterError):
        call()


q_values = st.floats(min_value=1e-4, max_value=1.0)
sigmas = st.floats(min_value=0.3, max_value=30.0)
steps_values = st.integers(min_value=1, max_value=100_000)


@settings(max_examples=40, deadline=None)
@given(q=q_values, sigma=sigmas, steps=steps_values)
def test_epsilon_grows_with_steps(q, sigma, steps):
    assert _epsilon(q, sigma, steps + 1 + steps // 10) >= _epsilon(q, sigma, steps)


@settings(max_examples=40, deadline=None)
@given(q=st.floats(min_value=1e-4, max_value=0.9), sigma=sigmas, steps=steps_values)
def test_epsilon_grows_with_sample_rate(q, sigma, steps):
    assert _epsilon(min(1.0, q * 1.1), sigma, steps) >= _epsilon(q, sigma, steps)


@settings(max_examples=40, deadline=None)
@given(q=q_values, sigma=sigmas, steps=steps_values)
def test_epsilon_falls_with_noise(q, sigma, steps):
    assert _epsilon(q, sigma * 1.1, steps) <= _epsilon(q, sigma, steps)


@settings(max_examples=40, deadline=None)
@given(q=q_values, sigma=sigmas, steps=steps_values, delta=st.floats(min_value=1e-12, max_value=0.1))
def test_epsilon_falls_with_delta(q, sigma, steps, delta):
    accountant = RDPAccountant()
    accountant.compose(PoissonSampled(q, Gaussian(sigma)), steps)
    assert accountant.get_epsilon(min(0.5, delta * 3)) <= accountant.get_epsilon(delta)


@settings(max_examples=15, deadline=None)
@given(
    target=st.floats(min_value=0.2, max_value=20.0),
    q=st.floats(min_value=1e-3, max_value=0.2),
    steps=st.integers(min_value=1, max_value=20_000),
)
def test_calibration_round_trip(target, q, steps):
    sigma = noise_multiplier_for(target, 1e-5, q, steps, accountant="rdp")
    assert _epsilon(q, sigma, steps) <= target
    assert steps_for(target, 1e-5, q, sigma, accountant="rdp") >= steps
