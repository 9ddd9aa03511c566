"""RDP and ε against independent oracles: dp_accounting, Opacus, mpmath integration, closed forms."""

import itertools
import json
import math
from pathlib import Path

import dp_accounting as dpa
import mpmath as mp
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp
from scipy import integrate, stats

from accountants import Composed, Gaussian, Laplace, PoissonSampled, RDPAccountant, rdp_curve

DP_ORDERS = dp_rdp.DEFAULT_RDP_ORDERS
DP_INTEGER_ORDERS = [a for a in DP_ORDERS if a == int(a)]
GRID_Q = [1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0]
GRID_SIGMA = [0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0]
GRID_STEPS = [1, 10, 100, 1000, 10_000, 100_000]
REFDATA = json.loads((Path(__file__).parents[1] / "data" / "dp_accounting_epsilon_grid.json").read_text())


def _dp_event(q, sigma, steps):
    inner = dpa.GaussianDpEvent(sigma) if q == 1 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    return dpa.SelfComposedDpEvent(inner, steps)


def _dp_epsilon(q, sigma, steps, orders, delta=1e-5):
    accountant = dp_rdp.RdpAccountant(orders)
    accountant.compose(_dp_event(q, sigma, steps))
    return accountant.get_epsilon_and_optimal_order(delta)


def _ours(q, sigma, steps, orders, delta=1e-5):
    accountant = RDPAccountant(orders)
    accountant.compose(PoissonSampled(q, Gaussian(sigma)), steps)
    return accountant.get_epsilon_and_order(delta)


def _mp_sgm_rdp(q, sigma, alpha, reverse=False):
    """Brute-force D_α between (1−q)N(0,σ²)+qN(1,σ²) and N(0,σ²), by mpmath quadrature at 40 digits."""
    with mp.workdps(40):
        q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

        def mu0(z):
            return mp.npdf(z, 0, s)

        def mix(z):
            return (1 - q) * mp.npdf(z, 0, s) + q * mp.npdf(z, 1, s)

        if reverse:
            integrand = lambda z: mix(z) * (mu0(z) / mix(z)) ** a  # noqa: E731
        else:
            integrand = lambda z: mu0(z) * (mix(z) / mu0(z)) ** a  # noqa: E731
        cuts = sorted({-40 * s, -12 * s, mp.mpf(0), mp.mpf(0.5), mp.mpf(1), a, a + 12 * s, a + 40 * s})
        total = mp.quad(integrand, cuts)
        return float(mp.log(total) / (a - 1))


@pytest.mark.parametrize("q", GRID_Q)
def test_integer_orders_agree_with_dp_accounting(q):
    """On integer orders (closed forms on both sides) ε agrees to a relative 1e-6 over the whole grid."""
    for sigma, steps in itertools.product(GRID_SIGMA, GRID_STEPS):
        expected, expected_order = _dp_epsilon(q, sigma, steps, DP_INTEGER_ORDERS)
        got, order = _ours(q, sigma, steps, DP_INTEGER_ORDERS)
        assert got == pytest.approx(expected, rel=1e-6), (q, sigma, steps)
        assert order == expected_order or got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("q", GRID_Q)
def test_default_orders_never_above_dp_accounting_and_lower_only_where_its_series_is_inexact(q):
    """With dp_accounting's default orders (fractional ones included) ε agrees to 1e-6, except where
    dp_accounting's fractional-order series is inexact or fails: there dpclip is lower, and at dpclip's
    optimal order mpmath confirms dpclip's RDP while dp_accounting's is higher or missing."""
    for sigma in GRID_SIGMA:
        theirs_rdp = dp_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, DP_ORDERS)
        ours_rdp = rdp_curve(PoissonSampled(q, Gaussian(sigma)), DP_ORDERS)
        for steps in GRID_STEPS:
            expected, _ = dp_rdp.compute_epsilon(DP_ORDERS, steps * theirs_rdp, 1e-5)
            got, order = _ours(q, sigma, steps, DP_ORDERS)
            if got == pytest.approx(expected, rel=1e-6):
                continue
            assert got < expected, (q, sigma, steps, got, expected)
            _assert_dp_accounting_inexact_at(q, sigma, order)


def _assert_dp_accounting_inexact_at(q, sigma, order):
    """Where dpclip reports a lower ε than dp_accounting: at dpclip's optimal order, dpclip's RDP equals
    brute-force integration and dp_accounting's series result is higher (or missing)."""
    ours = rdp_curve(PoissonSampled(q, Gaussian(sigma)), [order])[0]
    theirs = dp_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, [order])[0]
    assert ours == pytest.approx(_mp_sgm_rdp(q, sigma, order), rel=1e-9)
    assert not theirs <= ours * (1 + 1e-9), (q, sigma, order, theirs, ours)


def test_reference_grid_from_shared_refdata():
    """ε from the stored dp_accounting 0.6.0 grid (δ = 1e-5, its default orders)."""
    for row in REFDATA["gaussian"]:
        q, sigma = row["sample_rate"], row["noise_multiplier"]
        got, order = _ours(q, sigma, row["steps"], DP_ORDERS, row["delta"])
        assert got <= row["eps_rdp"] * (1 + 1e-6), row
        if got != pytest.approx(row["eps_rdp"], rel=1e-6):
            _assert_dp_accounting_inexact_at(q, sigma, order)
        if "eps_pld_pessimistic" in row:  # RDP is looser than the (tight) PLD accountant
            assert got >= row["eps_pld_pessimistic"] * (1 - 1e-3)


def test_matches_opacus_rdp():
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = [float(a) for a in DP_INTEGER_ORDERS]
    for q, sigma, steps in [(0.01, 1.0, 10_000), (0.004, 1.1, 2_344), (0.1, 3.0, 500), (1.0, 20.0, 50)]:
        rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        expected, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert _ours(q, sigma, steps, orders)[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "q, sigma, alpha",
    [
        (0.01, 1.0, 2),
        (0.01, 1.0, 4.1),
        (0.01, 50.0, 1.1),
        (0.1, 1.0, 1.6),
        (0.37, 4.2, 1.6),
        (0.5, 0.5, 10.9),
        (0.99, 0.5, 1.1),
        (1e-4, 0.3, 32),
        (1e-3, 2.0, 256),
    ],
)
def test_subsampled_gaussian_against_brute_force_integration(q, sigma, alpha):
    forward = _mp_sgm_rdp(q, sigma, alpha)
    backward = _mp_sgm_rdp(q, sigma, alpha, reverse=True)
    got = rdp_curve(PoissonSampled(q, Gaussian(sigma)), [alpha])[0]
    assert got == pytest.approx(forward, rel=1e-9)
    assert got >= backward * (1 - 1e-12)  # MTZ 2019: the forward direction dominates


def test_no_precision_loss_for_tiny_q_and_huge_sigma():
    """A_α − 1 ≈ C(α,2) q² (e^{1/σ²} − 1) is ~1e-15 here: summed naively it would drown in rounding."""
    q, sigma = 1e-6, 50.0
    got = rdp_curve(PoissonSampled(q, Gaussian(sigma)), [2.0, 3.5, 64.0])
    for alpha, value in zip([2.0, 3.5, 64.0], got):
        with mp.workdps(50):
            # Exact at integer orders: log Σ_k C(α,k) q^k (1−q)^{α−k} e^{(k²−k)/(2σ²)} / (α−1).
            if alpha == int(alpha):
                a = int(alpha)
                total = sum(
                    mp.binomial(a, k) * mp.mpf(q) ** k * (1 - mp.mpf(q)) ** (a - k) * mp.e ** (mp.mpf(k * k - k) / (2 * sigma**2))
                    for k in range(a + 1)
                )
                expected = float(mp.log(total) / (a - 1))
            else:
                expected = _mp_sgm_rdp(q, sigma, alpha)
        assert value == pytest.approx(expected, rel=1e-8)


def _mp_laplace_mixture_rdp(q, b, alpha, reverse=False):
    """Brute-force D_α between (1−q)Lap(0,b)+qLap(1,b) and Lap(0,b) (mpmath, 40 digits)."""
    with mp.workdps(40):
        q, b, a = mp.mpf(q), mp.mpf(b), mp.mpf(alpha)

        def lap(z, m):
            return mp.exp(-abs(z - m) / b) / (2 * b)

        def mix(z):
            return (1 - q) * lap(z, 0) + q * lap(z, 1)

        if reverse:
            integrand = lambda z: mix(z) * (lap(z, 0) / mix(z)) ** a  # noqa: E731
        else:
            integrand = lambda z: lap(z, 0) * (mix(z) / lap(z, 0)) ** a  # noqa: E731
        total = mp.quad(integrand, [-mp.inf, 0, 1, mp.inf])
        return float(mp.log(total) / (a - 1))


@pytest.mark.parametrize("b", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 7.0, 40.0])
def test_laplace_closed_form_against_integration(b, alpha):
    got = rdp_curve(Laplace(b), [alpha])[0]
    assert got == pytest.approx(_mp_laplace_mixture_rdp(1.0, b, alpha), rel=1e-9)


def test_laplace_matches_dp_accounting_except_where_pure_dp_is_tighter():
    for b, steps in itertools.product([0.5, 1.0, 2.0, 5.0], [1, 10, 100]):
        dp = dp_rdp.RdpAccountant(DP_ORDERS)
        dp.compose(dpa.SelfComposedDpEvent(dpa.LaplaceDpEvent(b), steps))
        expected = dp.get_epsilon(1e-5)
        ours = RDPAccountant(DP_ORDERS)
        ours.compose(Laplace(b), steps)
        # dpclip also knows that k Laplace(b) steps are (k/b, 0)-DP and takes the better of the two.
        assert ours.get_epsilon(1e-5) == pytest.approx(min(expected, steps / b), rel=1e-9)


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("b", [0.5, 1.0, 2.0, 5.0])
def test_subsampled_laplace_bound_covers_brute_force_both_directions(q, b):
    orders = [1.5, 2.0, 3.0, 5.0, 10.0, 24.0]
    bound = rdp_curve(PoissonSampled(q, Laplace(b)), orders)
    for alpha, value in zip(orders, bound):
        forward = _mp_laplace_mixture_rdp(q, b, alpha)
        backward = _mp_laplace_mixture_rdp(q, b, alpha, reverse=True)
        assert value >= max(forward, backward) * (1 - 1e-12), (alpha, value, forward, backward)
        assert value <= 3.0 * max(forward, backward) + 0.2  # and it is not vacuous


def test_subsampled_laplace_epsilon_is_above_pld_lower_estimate():
    """dp_accounting's optimistic PLD estimate is a lower bound on the true ε: ours must stay above it."""
    from dp_accounting.pld import pld_privacy_accountant

    for row in REFDATA["laplace"]:
        b, q, steps = row["noise_multiplier"], row["sample_rate"], row["steps"]
        inner = dpa.LaplaceDpEvent(b) if q == 1 else dpa.PoissonSampledDpEvent(q, dpa.LaplaceDpEvent(b))
        pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        pld._pessimistic_estimate = False
        pld.compose(dpa.SelfComposedDpEvent(inner, steps))
        event = Laplace(b) if q == 1 else PoissonSampled(q, Laplace(b))
        ours = RDPAccountant()
        ours.compose(event, steps)
        assert ours.get_epsilon(row["delta"]) >= pld.get_epsilon(row["delta"]) * (1 - 1e-9), row


def _composite_rdp_brute_force(q, b, sigma, alpha, reverse):
    """D_α for one Poisson-sampled step releasing (Laplace(b) on a sum, Gaussian(σ) on a count), by 2-D
    Simpson quadrature on a fine grid, split at the Laplace kinks x = 0 and x = 1."""
    y = np.linspace(-14 * sigma, alpha + 14 * sigma, 4001)
    log_ratio_y = (2 * y - 1) / (2 * sigma**2)
    total = 0.0
    for xa, xb in [(-40 * b, 0.0), (0.0, 1.0), (1.0, 1 + 40 * b)]:
        x = np.linspace(xa, xb, 2001)
        log_ratio = ((np.abs(x) - np.abs(x - 1)) / b)[:, None] + log_ratio_y[None, :]
        mix = 1 - q + q * np.exp(log_ratio)
        absent = stats.laplace.pdf(x, scale=b)[:, None] * stats.norm.pdf(y, scale=sigma)[None, :]
        values = absent * (mix ** (1 - alpha) if reverse else mix**alpha)
        total += integrate.simpson(integrate.simpson(values, x=y, axis=1), x=x)
    return math.log(total) / (alpha - 1)


def test_composite_brute_force_reproduces_the_exact_forward_moment():
    """Check of the quadrature itself: for integer α the forward moment has a closed form,
    Σ_k C(α,k)(1−q)^{α−k} q^k e^{(k−1)(ε_Lap(k) + ε_Gauss(k))} (binomial expansion, independent coordinates)."""
    q, b, sigma, alpha = 0.05, 1.5, 2.0, 3
    k = np.arange(alpha + 1, dtype=float)
    lap = np.array([0.0, 0.0] + list(rdp_curve(Laplace(b), k[2:])))
    moments = np.exp((k - 1) * (lap + k / (2 * sigma**2)))
    moments[:2] = 1.0
    weights = np.array([math.comb(alpha, int(j)) * (1 - q) ** (alpha - j) * q**j for j in k])
    exact = math.log(weights @ moments) / (alpha - 1)
    assert _composite_rdp_brute_force(q, b, sigma, alpha, reverse=False) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 6.0])
def test_composite_laplace_plus_gaussian_count_covers_brute_force(alpha):
    """The adaptive-clipping step with Laplace noise: Zhu & Wang's bound on the composite mechanism."""
    q, b, sigma = 0.05, 1.5, 2.0
    bound = rdp_curve(PoissonSampled(q, Composed([Laplace(b), Gaussian(sigma)])), [alpha])[0]
    exact = max(_composite_rdp_brute_force(q, b, sigma, alpha, r) for r in (False, True))
    assert exact <= bound * (1 + 1e-6)  # 1e-6: the quadrature's accuracy, checked in the test above
    assert bound <= 3 * exact + 0.2


def test_composed_gaussians_on_one_sample_equal_a_single_gaussian():
    """Two Gaussian releases on the same Poisson sample = one Gaussian with σ = (σ1⁻² + σ2⁻²)^{−1/2}."""
    s1, s2 = 1.2, 5.0
    combined = (s1**-2 + s2**-2) ** -0.5
    got = rdp_curve(PoissonSampled(0.02, Composed([Gaussian(s1), Gaussian(s2)])), DP_ORDERS)
    expected = dp_rdp._compute_rdp_poisson_subsampled_gaussian(0.02, combined, DP_INTEGER_ORDERS)
    integer = np.isin(DP_ORDERS, DP_INTEGER_ORDERS)
    np.testing.assert_allclose(got[integer], expected, rtol=1e-8)


@pytest.mark.parametrize("sigma, steps", [(0.8, 1), (2.0, 10), (5.0, 1000), (30.0, 10_000)])
def test_epsilon_is_an_upper_bound_of_the_exact_gaussian_composition(sigma, steps):
    """q = 1: T Gaussian steps are exactly a Gaussian with μ = √T/σ; its δ(ε) is in closed form
    (Balle & Wang 2018, Thm. 8). Our ε must be at least the exact one, i.e. δ_exact(ε_ours) ≤ δ."""
    delta = 1e-5
    mu = math.sqrt(steps) / sigma

    def exact_delta(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    accountant = RDPAccountant()
    accountant.compose(Gaussian(sigma), steps)
    eps = accountant.get_epsilon(delta)
    assert exact_delta(eps) <= delta
    assert exact_delta(eps * 0.5) > delta  # and RDP is within a factor 2 of the truth here
    for eps_query in [0.5 * eps, eps, 2 * eps]:
        assert accountant.get_delta(eps_query) >= exact_delta(eps_query) - 1e-15


def test_tiny_noise_multiplier_uses_a_bounded_grid_and_an_upper_bound(monkeypatch):
    """σ → 0 must neither exhaust memory nor crash; the fallback for fractional orders is an upper bound."""
    from accountants import rdp as rdp_module

    orders = np.array([1.5, 2.0, 2.5, 3.0, 7.3, 8.0])
    exact = rdp_module.subsampled_gaussian_rdp(0.1, 0.7, orders)
    monkeypatch.setattr(rdp_module, "QUADRATURE_MAX_POINTS", 0)  # force the convexity bound
    bounded = rdp_module.subsampled_gaussian_rdp(0.1, 0.7, orders)
    integer = orders == np.floor(orders)
    np.testing.assert_allclose(bounded[integer], exact[integer], rtol=1e-12)
    assert np.all(bounded[~integer] >= exact[~integer] * (1 - 1e-12))
    assert np.all(bounded[~integer] <= exact[~integer] * 2.0)  # and not absurdly loose
    monkeypatch.undo()
    tiny = rdp_module.subsampled_gaussian_rdp(0.1, 1e-12, np.array([1.5, 2.0, 10.5]))
    assert np.all(np.isfinite(tiny) | np.isinf(tiny)) and np.all(tiny > 1e20)
