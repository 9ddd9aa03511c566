"""The shared accountant interface: public modules, the Accountant base class, EpsilonResult, the registry.

Oracles: dp_accounting's RDP and PLD accountants, and closed forms (Laplace(b) is (1/b)-DP; k Gaussians of
noise σ are one Gaussian of noise σ/√k, whose exact ε is Balle & Wang 2018, Thm. 8).
"""

import dataclasses
import json
import logging
import math
from typing import Any

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

import accountants
from accountants import (
    ACCOUNTANTS,
    Accountant,
    EpsilonResult,
    Gaussian,
    Laplace,
    PLDAccountant,
    PoissonSampled,
    PrivacyParameterError,
    RDPAccountant,
    make_accountant,
)
from accountants import checks, errors
from accountants.rdp import pure_epsilon
from tests.accountants.test_pld import gaussian_epsilon

logging.getLogger("absl").setLevel(logging.ERROR)
STEP = PoissonSampled(0.02, Gaussian(1.1))


# ---------------------------------------------------------------------------------------------------
# Public modules
# ---------------------------------------------------------------------------------------------------


def test_errors_and_checks_are_public_and_the_old_module_re_exports_them():
    from accountants import _validation

    assert accountants.PrivacyParameterError is errors.PrivacyParameterError is _validation.PrivacyParameterError
    assert accountants.UnsupportedEventError is errors.UnsupportedEventError
    assert issubclass(errors.UnsupportedEventError, errors.PrivacyParameterError)
    assert issubclass(errors.PrivacyParameterError, ValueError)
    for name in ["check_positive", "check_nonnegative", "check_delta", "check_count", "check_sample_rate",
                 "warn_if_delta_too_large", "check_noise_multiplier"]:
        assert getattr(_validation, name) is getattr(checks, name), name
    assert checks.check_delta(1e-5) == 1e-5 and checks.check_count("n", 3) == 3
    assert checks.check_sample_rate(0.5) == 0.5 and checks.check_positive("x", 2) == 2.0


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: checks.check_count("steps", 10**400, maximum=10), ["steps", "integer <= 10", "401 digits"]),
        (lambda: checks.check_count("steps", checks.MAX_STEPS + 1, maximum=checks.MAX_STEPS), ["<= 1,000,000,000,000"]),
        (lambda: checks.check_positive("sigma", 10**400), ["sigma", "finite"]),
        (lambda: checks.check_noise_multiplier("sigma", 1e-200), ["sigma", "[1e-100, 1e+100]"]),
        (lambda: checks.check_noise_multiplier("sigma", 1e200), ["sigma", "[1e-100, 1e+100]"]),
        (lambda: checks.check_delta(float("nan")), ["delta", "finite"]),
    ],
)
def test_checks_refuse_extreme_values_with_a_message_that_names_the_limit(call, words):
    with pytest.raises(PrivacyParameterError) as error:
        call()
    assert all(word in str(error.value) for word in words), str(error.value)


def test_delta_warning_survives_a_dataset_size_beyond_the_float_range():
    with pytest.warns(errors.PrivacyWarning, match="1/dataset_size"):
        checks.warn_if_delta_too_large(1e-5, 10**400)  # 1/N underflows; δ ≥ 1/N all the same


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------


def test_make_accountant_reads_the_registry(monkeypatch):
    class Tracking(RDPAccountant):
        pass

    monkeypatch.setitem(ACCOUNTANTS, "tracking", Tracking)
    made = make_accountant("tracking", orders=[2.0, 4.0])
    assert type(made) is Tracking and made.orders == (2.0, 4.0)
    assert all(issubclass(cls, Accountant) for cls in ACCOUNTANTS.values())


@pytest.mark.parametrize("name", ["moments", "RDP", "", None, ["rdp"]])
def test_unknown_accountant_names_list_the_choices(name):
    with pytest.raises(PrivacyParameterError) as error:
        make_accountant(name)
    assert "'rdp'" in str(error.value) and "'pld'" in str(error.value)


def test_options_of_the_other_accountant_are_refused():
    with pytest.raises(PrivacyParameterError, match="do not apply to the 'rdp' accountant.*orders"):
        make_accountant("rdp", value_discretization_interval=1e-4)
    with pytest.raises(PrivacyParameterError, match="do not apply to the 'pld' accountant"):
        make_accountant("pld", orders=[2.0])


# ---------------------------------------------------------------------------------------------------
# EpsilonResult and the uniform query
# ---------------------------------------------------------------------------------------------------


def test_epsilon_result_is_a_frozen_record():
    result = EpsilonResult(1.5, order=8.0)
    assert (result.epsilon, result.order, result.error) == (1.5, 8.0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.epsilon = 0.0  # type: ignore[misc]


def test_rdp_result_carries_the_order_and_matches_dp_accounting():
    orders = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    ours = RDPAccountant(orders)
    ours.compose(STEP, 500)
    theirs = dp_rdp.RdpAccountant(orders)
    theirs.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(1.1)), 500))
    result = ours.epsilon_result(1e-6)
    eps, order = theirs.get_epsilon_and_optimal_order(1e-6)
    assert result.error is None and result.order == order
    assert result.epsilon == pytest.approx(eps, rel=1e-6)
    assert (result.epsilon, result.order) == ours.get_epsilon_and_order(1e-6)
    assert result.epsilon == ours.get_epsilon(1e-6)


def test_pld_result_carries_a_valid_error_bound():
    sigma, steps, delta = 3.0, 400, 1e-6
    ours = PLDAccountant()
    ours.compose(Gaussian(sigma), steps)
    result = ours.epsilon_result(delta)
    assert result.order is None and result.error is not None and result.error > 0
    assert (result.epsilon, result.error) == ours.get_epsilon_and_error(delta)
    # k Gaussian(σ) are one Gaussian(σ/√k) (Dong, Roth & Su 2022, Cor. 3.3), whose exact ε is a closed form
    # (Balle & Wang 2018, Thm. 8): it lies in [ε − error, ε].
    exact = gaussian_epsilon(sigma / math.sqrt(steps), delta)
    assert result.epsilon - result.error <= exact <= result.epsilon * (1 + 1e-12)


def test_pure_dp_composition_reports_order_infinity():
    accountant = RDPAccountant()
    accountant.compose(Laplace(4.0), 3)
    assert accountant.epsilon_result(1e-9) == EpsilonResult(0.75, order=math.inf)  # 3 × 1/b


# ---------------------------------------------------------------------------------------------------
# The base class: history, check-then-commit, persistence, equality, summary
# ---------------------------------------------------------------------------------------------------

BAD_COMPOSITIONS = [
    ("not an event", lambda a: a.compose("gaussian")),
    ("negative count", lambda a: a.compose(STEP, -1)),
    ("float count", lambda a: a.compose(STEP, 2.0)),
    ("count beyond the limit", lambda a: a.compose(STEP, 10**400)),
    ("history beyond the limit", lambda a: a.compose(STEP, checks.MAX_STEPS)),
    ("unsupported by PLD", lambda a: a.compose(PoissonSampled(0.1, accountants.Composed([Laplace(1.0), Laplace(2.0)])))),
]


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("what, bad", BAD_COMPOSITIONS, ids=[c[0] for c in BAD_COMPOSITIONS])
def test_a_refused_composition_changes_nothing(kind, what, bad):
    accountant = make_accountant(kind)
    accountant.compose(STEP, 7)
    before = accountant.state_dict()
    try:
        bad(accountant)
    except PrivacyParameterError:
        pass
    else:
        assert kind == "rdp" and what == "unsupported by PLD"  # RDP has a general bound for it
        return
    assert accountant.state_dict() == before and accountant.steps == 7


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_history_steps_reset_and_equality(kind):
    a, b = make_accountant(kind), make_accountant(kind)
    for accountant in (a, b):
        accountant.compose(STEP, 3)
        accountant.compose(STEP, 2)
        accountant.compose(Gaussian(5.0))
    assert a == b and a.steps == 6 and [e.count for e in a.history] == [5, 1]
    assert a != make_accountant("pld" if kind == "rdp" else "rdp")  # another kind never equals
    restored = type(a).from_state_dict(json.loads(json.dumps(a.state_dict())))
    assert type(restored) is type(a) and restored == a
    assert restored.get_epsilon(1e-5) == a.get_epsilon(1e-5)
    a.reset()
    assert a.steps == 0 and a.history == () and a.get_epsilon(1e-5) == 0.0 and a != b


@pytest.mark.parametrize("kind, words", [("rdp", ["at order α ="]), ("pld", ["numerical error bound"])])
def test_summary_reports_what_the_result_carries(kind, words):
    accountant = make_accountant(kind)
    accountant.compose(STEP, 10)
    text = accountant.summary(delta=1e-5)
    assert text.startswith(f"{type(accountant).__name__}: 10 composed events")
    assert all(word in text for word in words)


def test_the_base_class_supplies_everything_but_the_measurement():
    """A pure-DP accountant written against the base class: only the measurement and its settings."""

    class PureAccountant(Accountant):
        state_format = "tests.PureAccountant"

        def _epsilon_result(self, history, delta):
            return EpsilonResult(sum(entry.count * pure_epsilon(entry.event) for entry in history))

        def _delta(self, history, epsilon):
            return 0.0 if epsilon >= self._epsilon_result(history, 0.5).epsilon else 1.0

        def _settings(self) -> dict[str, Any]:
            return {}

        def _parse_settings(self, state):
            return None

        def _apply_settings(self, settings) -> None:
            pass

    accountant = PureAccountant()
    accountant.compose(Laplace(2.0), 3)
    accountant.compose(PoissonSampled(0.5, Laplace(1.0)))
    # Dwork et al. 2006 (Laplace is 1/b-DP), Balle, Barthe & Gaboardi 2018, Thm. 8 (sampling), composition adds.
    expected = 3 * 0.5 + math.log(1 + 0.5 * (math.e - 1))
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-12)
    assert accountant.get_epsilon_after(Laplace(4.0), 1e-5, count=2) == pytest.approx(expected + 0.5, rel=1e-12)
    assert accountant.steps == 4 and accountant.get_delta(expected + 1e-9) == 0.0
    assert PureAccountant.from_state_dict(accountant.state_dict()) == accountant
    with pytest.raises(PrivacyParameterError, match="not a PureAccountant state"):
        accountant.load_state_dict(RDPAccountant().state_dict())
    assert "PureAccountant: 4 composed events" in accountant.summary(1e-5)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_a_release_without_noise_has_no_finite_epsilon(kind):
    """NonPrivate (DP-SGD with σ = 0): ε = ∞ and δ(ε) = 1 for every ε, whatever else was composed; persists."""
    accountant = accountants.make_accountant(kind)
    accountant.compose(accountants.PoissonSampled(0.01, accountants.Gaussian(1.0)), 100)
    assert math.isfinite(accountant.get_epsilon(1e-5))
    sampled_no_noise = accountants.PoissonSampled(0.01, accountants.NonPrivate())
    assert accountant.get_epsilon_after(sampled_no_noise, 1e-5) == math.inf
    accountant.compose(sampled_no_noise)
    assert accountant.get_epsilon(1e-5) == math.inf and accountant.get_delta(1000.0) == 1.0
    restored = accountants.make_accountant(kind)
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored == accountant and restored.get_epsilon(0.5) == math.inf
    assert accountants.event_from_dict(sampled_no_noise.to_dict()) == sampled_no_noise


# ---------------------------------------------------------------------------------------------------
# The printed (ε, δ) pair
# ---------------------------------------------------------------------------------------------------
def test_a_printed_delta_is_never_below_the_delta_epsilon_was_computed_at():
    """The statement printed δ to 3 digits rounded to nearest (δ = 1.2349e-5 as 1.23e-05), and ε rounded up to 4
    digits did not always cover the gap: at σ = 1.0007 it claimed (1.798, 1.23e-05) where the accountant itself
    gives ε = 1.79825 at δ = 1.23e-05. The Gaussian's exact ε (Balle & Wang 2018) at the printed δ, for 40 steps
    without sampling, must not exceed the printed ε either."""
    import re

    from accountants.statement import format_delta

    for value in (1.2349e-5, 1 / 30000, 1 / 60000, 9.9951e-7, 0.05, 1e-5):
        for digits in (3, 6):
            assert float(format_delta(value, digits)) >= value
    delta = 1.2349e-5
    for i in range(40):
        sigma = 1.0 + 0.0007 * i
        for event, count, exact in ((PoissonSampled(0.01, Gaussian(sigma)), 1000, None),
                                    (Gaussian(sigma * 6), 40, lambda d, s=sigma: gaussian_epsilon(s * 6 / math.sqrt(40), d))):
            accountant = PLDAccountant()
            accountant.compose(event, count)
            text = accountants.privacy_statement(accountant.get_epsilon(delta), delta, steps=count, sample_rate=0.01,
                                                 noise_multiplier=sigma, accountant="PLD")
            printed = re.search(r"ε = ([0-9.e+-]+), δ = ([0-9.e+-]+)\)", text)
            epsilon_shown, delta_shown = float(printed.group(1)), float(printed.group(2))
            assert delta_shown >= delta and accountant.get_epsilon(delta_shown) <= epsilon_shown, (sigma, text)
            if exact is not None:
                assert exact(delta_shown) <= epsilon_shown


def _deeply_nested_state() -> dict[str, Any]:
    event: dict[str, Any] = {"type": "gaussian", "noise_multiplier": 1.0}
    for _ in range(5000):
        event = {"type": "poisson_sampled", "sample_rate": 0.999, "mechanism": event}
    state = RDPAccountant().state_dict()
    state["history"] = [{"event": event, "count": 1}]
    return state


def _rdp_state_with_orders(orders: Any) -> dict[str, Any]:
    state = RDPAccountant().state_dict()
    state["orders"] = orders
    return state


@pytest.mark.parametrize("call, words", [
    (lambda: accountants.calibrate_noise(lambda s: PoissonSampled(0.01, Gaussian(s)), 3.0, 1e-5, 100, rtol=math.nan,
                                         accountant="rdp"), "rtol"),  # never returned before
    (lambda: accountants.calibrate_noise(lambda s: PoissonSampled(0.01, Gaussian(s)), 3.0, 1e-5, 100, rtol=0.0), "rtol"),
    (lambda: accountants.calibrate_noise(lambda s: PoissonSampled(0.01, Gaussian(s)), 3.0, 1e-5, 100, rtol=-1.0), "rtol"),
    (lambda: RDPAccountant(orders="abc"), "list of finite numbers"),
    (lambda: RDPAccountant(orders=[2, "x"]), "list of finite numbers"),
    (lambda: RDPAccountant(orders=5), "list of finite numbers"),
    (lambda: RDPAccountant(orders=[2.0**40]), "at most"),  # accepted, then MemoryError at the first query
    (lambda: RDPAccountant().load_state_dict(_rdp_state_with_orders("abc")), "list of finite numbers"),
    (lambda: PLDAccountant(value_discretization_interval=1e-9), "finer than"),  # accepted, then 31 GiB asked for
    (lambda: PLDAccountant(points_per_std=1e6), "exceeds"),
    (lambda: accountants.Composed(Gaussian(1.0)), "takes a list of events"),  # TypeError before
    (lambda: RDPAccountant().load_state_dict(_deeply_nested_state()), "nested too deeply"),  # RecursionError before
    (lambda: accountants.privacy_statement(math.nan, 1e-5, steps=1, sample_rate=0.1), "epsilon must be"),
    (lambda: accountants.privacy_statement(-1.0, 1e-5, steps=1, sample_rate=0.1), "epsilon must be"),
    (lambda: accountants.privacy_statement(1.0, 2.0, steps=1, sample_rate=0.1), "delta must be"),
], ids=["rtol nan", "rtol 0", "rtol negative", "orders a string", "orders with a string", "orders a scalar",
        "order 2^40", "state orders a string", "grid step 1e-9", "points per std 1e6", "Composed of one event",
        "state nested 5000 deep", "statement ε nan", "statement ε negative", "statement δ 2"])
def test_accountant_inputs_that_raised_numpy_errors_hung_or_printed_nonsense_are_refused(call, words):
    """Found by a probe: each raised numpy/scipy/Python errors, hung, ran out of memory later, or printed
    "(ε = nan ...)"; now PrivacyParameterError with what to pass."""
    with pytest.raises(PrivacyParameterError, match=words):
        call()
