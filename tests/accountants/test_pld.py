"""PLDAccountant against independent oracles.

Oracles: the analytical Gaussian mechanism (Balle & Wang 2018, Thm. 8, implemented here), dp_accounting's PLD
accountant (pessimistic "connect the dots", and its optimistic "privacy buckets" estimate), Opacus's PRV
accountant (Gopi, Lee & Wutschitz 2021, with its error bounds), a one-step numerical integration for
Laplace + Gaussian on one Poisson sample (written here), and pure-DP / post-processing bounds.
"""

import json
import logging
import math
import subprocess
import sys

import dp_accounting as dpa
import pytest
from dp_accounting.pld import privacy_loss_distribution as dpl
from scipy import integrate
from scipy.optimize import brentq
from scipy.special import log_ndtr
from scipy.stats import norm

from accountants import (
    Composed,
    Gaussian,
    Laplace,
    PLDAccountant,
    PoissonSampled,
    PrivacyParameterError,
    RDPAccountant,
    UnsupportedEventError,
    make_accountant,
    noise_multiplier_for,
    steps_for,
)

logging.getLogger("absl").setLevel(logging.ERROR)
DELTAS = [1e-5, 1e-6]


# ---------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------


def gaussian_delta(mu: float, eps: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with μ = sensitivity/σ (Balle & Wang 2018, Thm. 8).

    δ = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), evaluated as Φ(a)(1 − e^{ε + log Φ(b) − log Φ(a)}) to avoid overflow.
    """
    log_a, log_b = log_ndtr(-eps / mu + mu / 2), log_ndtr(-eps / mu - mu / 2)
    return math.exp(log_a) * -math.expm1(min(eps + log_b - log_a, 0.0))


def gaussian_epsilon(sigma_eff: float, delta: float) -> float:
    mu = 1.0 / sigma_eff
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    return brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-13, rtol=1e-14)


def _dp_sampled(q, inner):
    return inner if q == 1 else dpa.PoissonSampledDpEvent(q, inner)


def dp_pessimistic(phases, deltas, h=1e-4, laplace=False):
    """ε from dp_accounting's PLDAccountant (add/remove adjacency, pessimistic) for [(q, σ or b, T), ...]."""
    accountant = dpa.pld.PLDAccountant(value_discretization_interval=h)
    for q, s, steps in phases:
        inner = dpa.LaplaceDpEvent(s) if laplace else dpa.GaussianDpEvent(s)
        accountant.compose(dpa.SelfComposedDpEvent(_dp_sampled(q, inner), steps))
    return [accountant.get_epsilon(d) for d in deltas]


def dp_optimistic(phases, deltas, h=1e-4, laplace=False):
    """dp_accounting's optimistic estimate (losses rounded down): a lower bound on the exact ε."""
    total = None
    for q, s, steps in phases:
        if laplace:
            pld = dpl.from_laplace_mechanism(
                s, sampling_prob=q, value_discretization_interval=h, pessimistic_estimate=False, use_connect_dots=False
            )
        else:
            pld = dpl.from_gaussian_mechanism(
                s, sampling_prob=q, value_discretization_interval=h, pessimistic_estimate=False, use_connect_dots=False
            )
        pld = pld.self_compose(steps)
        total = pld if total is None else total.compose(pld)
    return [total.get_epsilon_for_delta(d) for d in deltas]


def laplace_gaussian_delta(q: float, b: float, sigma: float, eps: float) -> float:
    """Exact δ(ε) of one PoissonSampled(q, [Laplace(b) + Gaussian(σ)]) run, worse of add and remove.

    x ~ Laplace(0, b) and y ~ N(0, σ²) without the record; with it both shift by 1, so the likelihood ratio
    is c(x)·exp((2y−1)/(2σ²)) with c(x) = exp((|x| − |x−1|)/b). The y-integral is done in closed form, the
    x-integral by quadrature (plus the two constant pieces x ≤ 0 and x ≥ 1).
    """
    e = math.exp(eps)

    def remove(c):  # E_y[((1−q) + q c r − e^ε)₊]
        a = e - (1 - q)
        if a <= 0:
            return (1 - q) + q * c - e
        y = sigma**2 * math.log(a / (q * c)) + 0.5
        return q * c * norm.sf((y - 1) / sigma) - a * norm.sf(y / sigma)

    def add(c):  # E_y[(1 − e^ε((1−q) + q c r))₊]
        a = 1 - e * (1 - q)
        if a <= 0:
            return 0.0
        y = sigma**2 * math.log(a / (e * q * c)) + 0.5
        return a * norm.cdf(y / sigma) - e * q * c * norm.cdf((y - 1) / sigma)

    out = []
    for f in (remove, add):
        total = 0.5 * f(math.exp(-1 / b)) + 0.5 * math.exp(-1 / b) * f(math.exp(1 / b))
        total += integrate.quad(
            lambda x: math.exp(-x / b) / (2 * b) * f(math.exp((2 * x - 1) / b)), 0, 1, epsabs=1e-15, epsrel=1e-12
        )[0]
        out.append(total)
    return max(out)


def ours(events, deltas, **options):
    accountant = PLDAccountant(**options)
    for event, count in events:
        accountant.compose(event, count)
    return [accountant.get_epsilon(d) for d in deltas], accountant


# ---------------------------------------------------------------------------------------------------
# Poisson-subsampled Gaussian against dp_accounting (pessimistic and optimistic)
# ---------------------------------------------------------------------------------------------------

# (q, σ, steps, dp_accounting grid): q ∈ [1e-3, 1], σ ∈ [0.5, 10], steps ∈ [1, 1e5]. dp_accounting is slow for
# small σ (a wide loss range at a fine grid); there its grid is 1e-3, which only makes its estimate looser.
GRID = [
    (1e-3, 10.0, 1, 1e-4),
    (1e-3, 1.0, 10_000, 1e-4),
    (1e-3, 0.5, 100_000, 1e-3),
    (0.01, 1.0, 10_000, 1e-4),
    (0.01, 2.0, 100_000, 1e-4),
    (0.01, 0.5, 1, 1e-3),
    (0.1, 2.0, 1_000, 1e-3),
    (0.1, 10.0, 100_000, 1e-3),
    (0.1, 0.5, 100, 1e-3),
    (0.5, 5.0, 1_000, 1e-3),
    (1.0, 0.5, 1, 1e-3),
]


@pytest.mark.parametrize("q, sigma, steps, h", GRID)
def test_subsampled_gaussian_is_tight_and_never_optimistic(q, sigma, steps, h):
    pessimistic = dp_pessimistic([(q, sigma, steps)], DELTAS, h)
    optimistic = dp_optimistic([(q, sigma, steps)], DELTAS, h)
    eps, accountant = ours([(PoissonSampled(q, Gaussian(sigma)), steps)], DELTAS)
    for delta, mine, pess, opt in zip(DELTAS, eps, pessimistic, optimistic):
        assert mine >= opt, (delta, mine, opt)  # never below a lower bound on the exact value
        assert mine <= pess * 1.01 + 1e-6, (delta, mine, pess)  # within 1% above dp_accounting's upper bound
        assert mine <= pess * (1 + 2e-4) + 2e-6  # in fact much closer
        upper, error = accountant.get_epsilon_and_error(delta)
        assert upper == mine and 0 <= error <= 0.05 * mine + 1e-5
        assert upper - error <= pess  # the certified lower end is below dp_accounting's upper bound


@pytest.mark.parametrize(
    "q, sigma, steps",
    [(1e-3, 1.0, 10_000), (0.1, 2.0, 1_000), (0.01, 0.5, 1)],
)
def test_within_opacus_prv_error_bounds(q, sigma, steps):
    """Opacus's PRV accountant (Gopi et al. 2021) returns an estimate with rigorous lower and upper bounds."""
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    # What PRVAccountant.get_epsilon(1e-5) does (it reports `upper`), keeping the lower bound as well.
    lower, _, upper = prv._get_dprv(eps_error=0.01, delta_error=1e-8).compute_epsilon(1e-5, 1e-8, 0.01)
    (mine,), _ = ours([(PoissonSampled(q, Gaussian(sigma)), steps)], [1e-5])
    assert lower <= mine <= upper * 1.01


# ---------------------------------------------------------------------------------------------------
# Exact values: Gaussian compositions without sampling
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("steps", [1, 10, 1000, 100_000])
def test_gaussian_composition_matches_the_analytical_gaussian_mechanism(sigma, steps):
    """T steps of Gaussian(σ) are one Gaussian with σ/√T; ε must be ≥ exact and the error bound must hold."""
    eps, accountant = ours([(Gaussian(sigma), steps)], DELTAS)
    for delta, mine in zip(DELTAS, eps):
        exact = gaussian_epsilon(sigma / math.sqrt(steps), delta)
        assert mine >= exact - 1e-9 * max(exact, 1.0)
        assert mine <= exact * (1 + 2e-3) + 1e-6
        _, error = accountant.get_epsilon_and_error(delta)
        assert mine - error <= exact + 1e-9 * max(exact, 1.0)


def test_mixed_gaussian_history_without_sampling_is_one_gaussian():
    history = [(Gaussian(2.0), 30), (Composed([Gaussian(3.0), Gaussian(4.0)]), 20), (Gaussian(1.5), 1)]
    inverse_sq = 30 / 4.0 + 20 * (1 / 9 + 1 / 16) + 1 / 2.25
    for delta, mine in zip(DELTAS, ours(history, DELTAS)[0]):
        exact = gaussian_epsilon(inverse_sq**-0.5, delta)
        assert exact <= mine <= exact * (1 + 1e-3)


def test_get_delta_matches_the_analytical_gaussian_mechanism():
    accountant = PLDAccountant()
    accountant.compose(Gaussian(5.0), 100)  # μ = 2
    for eps in [0.0, 1.0, 3.0, 6.0]:
        exact = gaussian_delta(2.0, eps)  # grid points: the connect-the-dots δ equals it up to round-off
        assert exact * (1 - 1e-12) <= accountant.get_delta(eps) <= exact * 1.01 + 1e-12


# ---------------------------------------------------------------------------------------------------
# Laplace, alone and sampled, and Laplace + Gaussian on one sample (median clipping with L1 noise)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q, b, steps", [(1.0, 1.0, 1), (1.0, 2.0, 50), (0.1, 1.0, 100), (0.01, 0.5, 1000), (0.05, 3.0, 300)])
def test_laplace_against_dp_accounting(q, b, steps):
    pessimistic = dp_pessimistic([(q, b, steps)], DELTAS, laplace=True)
    optimistic = dp_optimistic([(q, b, steps)], DELTAS, laplace=True)
    eps, _ = ours([(PoissonSampled(q, Laplace(b)), steps)], DELTAS)
    pure = steps * math.log1p(q * math.expm1(1 / b))  # (Σε, 0)-DP composition bound
    for mine, pess, opt in zip(eps, pessimistic, optimistic):
        assert opt <= mine <= pess * 1.01
        assert mine <= pure * (1 + 1e-9)


def test_one_laplace_release_approaches_its_pure_dp_epsilon():
    (eps,), _ = ours([(Laplace(2.0), 1)], [1e-9])
    assert 0.5 - 1e-4 <= eps <= 0.5


@pytest.mark.parametrize("q, b, sigma", [(0.01, 1.0, 1.0), (0.1, 0.5, 2.0), (1.0, 2.0, 1.0), (0.05, 3.0, 0.7)])
def test_laplace_plus_gaussian_on_one_sample_matches_numerical_integration(q, b, sigma):
    event = PoissonSampled(q, Composed([Laplace(b), Gaussian(sigma)]))
    eps, _ = ours([(event, 1)], DELTAS)
    for delta, mine in zip(DELTAS, eps):
        if laplace_gaussian_delta(q, b, sigma, 0.0) <= delta:
            exact = 0.0
        else:
            exact = brentq(lambda e: laplace_gaussian_delta(q, b, sigma, e) - delta, 0.0, 60.0, xtol=1e-12)
        assert exact - 1e-9 <= mine <= exact * (1 + 1e-3) + 1e-5


def test_laplace_plus_gaussian_composition_is_bracketed():
    """T steps: at least each part alone (post-processing drops the other), at most the RDP bound."""
    q, b, sigma, steps = 0.01, 2.0, 1.5, 2000
    eps, _ = ours([(PoissonSampled(q, Composed([Laplace(b), Gaussian(sigma)])), steps)], DELTAS)
    gaussian_only = dp_optimistic([(q, sigma, steps)], DELTAS)
    laplace_only = dp_optimistic([(q, b, steps)], DELTAS, laplace=True)
    rdp = RDPAccountant()
    rdp.compose(PoissonSampled(q, Composed([Laplace(b), Gaussian(sigma)])), steps)
    for delta, mine, g, l in zip(DELTAS, eps, gaussian_only, laplace_only):
        assert max(g, l) <= mine <= rdp.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------------
# Heterogeneous histories, composition structure
# ---------------------------------------------------------------------------------------------------

PHASES = [(0.01, 1.0, 3000), (0.02, 0.8, 500), (0.005, 2.0, 5000)]


def test_heterogeneous_history_against_dp_accounting():
    pessimistic = dp_pessimistic(PHASES, DELTAS, h=1e-3)
    optimistic = dp_optimistic(PHASES, DELTAS, h=1e-3)
    eps, _ = ours([(PoissonSampled(q, Gaussian(s)), t) for q, s, t in PHASES], DELTAS)
    for mine, pess, opt in zip(eps, pessimistic, optimistic):
        assert opt <= mine <= pess * 1.01
        assert mine <= pess * (1 + 2e-4)


def test_history_order_does_not_matter_and_composed_events_count_like_repeats():
    forward, _ = ours([(PoissonSampled(q, Gaussian(s)), t) for q, s, t in PHASES], [1e-5])
    backward, _ = ours([(PoissonSampled(q, Gaussian(s)), t) for q, s, t in reversed(PHASES)], [1e-5])
    assert forward == backward
    inner = Composed([PoissonSampled(0.01, Gaussian(1.0)), PoissonSampled(0.05, Laplace(4.0))], count=100)
    as_block, _ = ours([(inner, 3)], [1e-5])
    as_parts, _ = ours([(PoissonSampled(0.01, Gaussian(1.0)), 300), (PoissonSampled(0.05, Laplace(4.0)), 300)], [1e-5])
    assert as_block == as_parts


def test_gaussians_on_one_sample_are_one_gaussian():
    merged, _ = ours([(PoissonSampled(0.02, Composed([Gaussian(2.0), Gaussian(2.0)])), 400)], [1e-5])
    single, _ = ours([(PoissonSampled(0.02, Gaussian(2.0 / math.sqrt(2))), 400)], [1e-5])
    assert merged == pytest.approx(single, rel=1e-9)


@pytest.mark.parametrize(
    "q, sigma, steps",
    [(256 / 60_000, 1.1, 2350), (0.01, 1.0, 10_000), (0.004, 0.8, 2000), (0.05, 2.0, 600), (0.001, 1.5, 50_000)],
)
def test_pld_is_tighter_than_rdp_on_dp_sgd_settings(q, sigma, steps):
    rdp = RDPAccountant()
    rdp.compose(PoissonSampled(q, Gaussian(sigma)), steps)
    (mine,), _ = ours([(PoissonSampled(q, Gaussian(sigma)), steps)], [1e-5])
    assert mine < rdp.get_epsilon(1e-5) * 0.98


def test_fixed_grid_matches_dp_accounting_on_the_same_grid():
    (pess,) = dp_pessimistic([(0.02, 1.0, 500)], [1e-5], h=1e-3)
    (mine,), _ = ours([(PoissonSampled(0.02, Gaussian(1.0)), 500)], [1e-5], value_discretization_interval=1e-3)
    assert mine == pytest.approx(pess, rel=2e-4)


# ---------------------------------------------------------------------------------------------------
# Queries, calibration
# ---------------------------------------------------------------------------------------------------


def test_get_delta_inverts_get_epsilon_and_matches_dp_accounting():
    accountant = PLDAccountant()
    accountant.compose(PoissonSampled(0.01, Gaussian(1.1)), 5000)
    theirs = dpa.pld.PLDAccountant()
    theirs.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), 5000))
    for delta in [1e-4, 1e-6, 1e-8]:
        eps = accountant.get_epsilon(delta)
        assert accountant.get_delta(eps) <= delta * (1 + 1e-9)
        assert accountant.get_delta(eps) == pytest.approx(delta, rel=1e-6)
    for eps in [1.0, 3.0]:
        assert accountant.get_delta(eps) == pytest.approx(theirs.get_delta(eps), rel=2e-3)


def test_empty_history_and_reset():
    accountant = PLDAccountant()
    assert accountant.get_epsilon(1e-5) == 0.0 and accountant.get_delta(0.0) == 0.0
    accountant.compose(PoissonSampled(0.01, Gaussian(1.0)), 10)
    assert accountant.get_epsilon(1e-5) > 0
    accountant.reset()
    assert accountant.steps == 0 and accountant.history == () and accountant.get_epsilon(1e-5) == 0.0


def test_epsilon_after_does_not_change_the_accountant():
    accountant = PLDAccountant()
    accountant.compose(PoissonSampled(0.01, Gaussian(1.0)), 100)
    before = accountant.state_dict()
    predicted = accountant.get_epsilon_after(PoissonSampled(0.01, Gaussian(1.0)), 1e-5, count=50)
    assert accountant.state_dict() == before
    accountant.compose(PoissonSampled(0.01, Gaussian(1.0)), 50)
    assert accountant.get_epsilon(1e-5) == predicted


def test_calibration_with_the_pld_accountant():
    q, steps, target = 0.02, 500, 2.0
    sigma = noise_multiplier_for(target, 1e-5, q, steps, accountant="pld")
    assert sigma < noise_multiplier_for(target, 1e-5, q, steps, accountant="rdp")  # PLD needs less noise than RDP
    (pess,) = dp_pessimistic([(q, sigma, steps)], [1e-5])
    assert pess <= target * (1 + 2e-4)  # dp_accounting agrees that the target is met
    (below,) = dp_optimistic([(q, sigma * 0.95, steps)], [1e-5])
    assert below > target  # 5% less noise would exceed the target even by an optimistic (lower) estimate
    assert steps_for(target, 1e-5, q, sigma * 1.01, accountant="pld") > steps


# ---------------------------------------------------------------------------------------------------
# Persistence, display, errors
# ---------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_through_json_is_exact():
    accountant = PLDAccountant()
    accountant.compose(PoissonSampled(0.01, Gaussian(1.0)), 700)
    accountant.compose(PoissonSampled(0.01, Composed([Laplace(3.0), Gaussian(4.0)])), 30)
    accountant.compose(Gaussian(7.5))
    restored = PLDAccountant.from_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored == accountant and restored.history == accountant.history
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)  # bit for bit
    fixed = PLDAccountant(value_discretization_interval=1e-3)
    assert PLDAccountant.from_state_dict(fixed.state_dict()).value_discretization_interval == 1e-3


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(format="dpclip.accountants.RDPAccountant"),
        lambda s: s.update(version=2),
        lambda s: s.update(value_discretization_interval=-1.0),
        lambda s: s.update(points_per_std=0),
        lambda s: s.pop("points_per_std"),
        lambda s: s["history"][0].update(count=0),
        lambda s: s["history"][0].update(count=1.5),
        lambda s: s["history"][0]["event"].update(type="exponential"),
        lambda s: s["history"][0]["event"].update(sample_rate=2.0),
        lambda s: s["history"][0].pop("event"),
        lambda s: s["history"].append(
            {"event": PoissonSampled(0.1, Composed([Laplace(1.0), Laplace(2.0)])).to_dict(), "count": 1}
        ),
    ],
)
def test_bad_state_is_refused_and_changes_nothing(mutate):
    source = PLDAccountant()
    source.compose(PoissonSampled(0.02, Gaussian(1.5)), 10)
    state = json.loads(json.dumps(source.state_dict()))
    mutate(state)
    target = PLDAccountant()
    target.compose(Gaussian(3.0), 2)
    before = target.state_dict()
    with pytest.raises(PrivacyParameterError):
        target.load_state_dict(state)
    assert target.state_dict() == before


def test_summary_history_and_repr():
    accountant = PLDAccountant()
    accountant.compose(PoissonSampled(0.01, Gaussian(1.0)), 10)
    accountant.compose(PoissonSampled(0.01, Gaussian(1.0)), 5)
    accountant.compose(PoissonSampled(0.02, Laplace(2.0)))
    text = accountant.summary(delta=1e-5)
    assert "15 × PoissonSampled(q=0.01, Gaussian(σ=1))" in text and "δ = 1e-05" in text and "error" in text
    assert accountant.steps == 16 and len(accountant.history) == 2
    assert repr(accountant) == "PLDAccountant(steps=16, entries=2)"


@pytest.mark.parametrize(
    "make",
    [
        lambda: PLDAccountant().compose(PoissonSampled(0.1, Composed([Laplace(1.0), Laplace(2.0)]))),
        lambda: PLDAccountant().compose(PoissonSampled(0.1, Composed([Laplace(1.0), Gaussian(1.0)], count=2))),
        lambda: PLDAccountant().compose(PoissonSampled(0.1, Composed([PoissonSampled(0.5, Gaussian(1.0)), Laplace(1.0)]))),
        lambda: PLDAccountant().get_epsilon_after(PoissonSampled(0.1, Composed([Laplace(1.0), Laplace(1.0)])), 1e-5),
    ],
)
def test_events_it_cannot_interpret_raise_a_clear_error(make):
    with pytest.raises(UnsupportedEventError, match="PLDAccountant cannot interpret .* use RDPAccountant"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: PLDAccountant().compose("gaussian"),
        lambda: PLDAccountant().compose(Gaussian(1.0), count=-1),
        lambda: PLDAccountant().compose(Gaussian(1.0), count=2.5),
        lambda: PLDAccountant().get_epsilon(0.0),
        lambda: PLDAccountant().get_epsilon(1.0),
        lambda: PLDAccountant().get_epsilon(float("nan")),
        lambda: PLDAccountant().get_epsilon_and_error(-1e-5),
        lambda: PLDAccountant().get_delta(-1.0),
        lambda: PLDAccountant(value_discretization_interval=0.0),
        lambda: PLDAccountant(points_per_std=float("inf")),
        lambda: make_accountant("moments"),
        lambda: make_accountant("pld", orders=[2.0, 4.0]),
        lambda: make_accountant("rdp", value_discretization_interval=1e-4),
        lambda: noise_multiplier_for(1.0, 1e-5, 0.01, 100, accountant="prv"),
    ],
)
def test_invalid_parameters_raise_a_clear_error(make):
    with pytest.raises(PrivacyParameterError) as error:
        make()
    assert any(word in str(error.value) for word in ("must", "apply", "accountant")), str(error.value)


def test_make_accountant_builds_either_kind():
    assert isinstance(make_accountant("rdp"), RDPAccountant)
    assert isinstance(make_accountant("pld", value_discretization_interval=1e-3), PLDAccountant)
    assert make_accountant().__class__ is PLDAccountant  # the default of the engine, the CLI and calibration


def test_pld_modules_never_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import accountants, accountants.pld, accountants.pld_accountant, accountants.factory\n"
        "a = accountants.make_accountant('pld'); a.compose(accountants.PoissonSampled(0.1, accountants.Gaussian(1.0)), 10)\n"
        "assert a.get_epsilon(1e-5) > 0\n"
        "assert not any(m.split('.')[0] == 'torch' for m in sys.modules if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
