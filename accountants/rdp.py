"""Rényi-DP curves ε(α) of the mechanisms in :mod:`accountants.events`.

Every function returns an *upper bound* on the Rényi divergence of order α between the output
distributions on add/remove-neighbouring data sets, in both directions. Everything is computed in log
space, and subtractive cancellation is avoided by summing only non-negative terms of A_α − 1, so tiny q,
huge σ, q close to 1 and orders in the thousands neither overflow nor lose relative precision.

Sources:
- Gaussian and Laplace closed forms: Mironov 2017, "Rényi Differential Privacy", Prop. 6, 7 (Table II).
- Poisson-subsampled Gaussian, exact: Mironov, Talwar & Zhang 2019, "Rényi DP of the Sampled Gaussian
  Mechanism" (arXiv:1908.10530), §3: ε(α) = log A_α / (α−1), A_α = E_{z∼N(0,σ²)}[(1−q+q·e^{(2z−1)/(2σ²)})^α],
  which dominates the reverse direction.
- Poisson-subsampled general mechanism: Zhu & Wang 2019, "Poisson Subsampled Rényi Differential Privacy",
  Thm. 6 (integer orders), extended to fractional orders by convexity of (α−1)ε(α) in α
  (van Erven & Harremoës 2014, Thm. 11).
- Pure ε-DP caps every order: ε(α) ≤ D_α(RR_ε) (randomized response dominates every ε-DP pair,
  Kairouz, Oh & Viswanath 2015, plus data processing), itself ≤ ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import gammaln

from .events import Composed, Event, Gaussian, Laplace, NonPrivate, PoissonSampled

__all__ = [
    "DEFAULT_ORDERS",
    "rdp_curve",
    "pure_epsilon",
    "gaussian_rdp",
    "laplace_rdp",
    "subsampled_gaussian_rdp",
    "subsampled_rdp_upper_bound",
    "randomized_response_rdp",
]

#: Default Rényi orders: fractional near 1, every tenth up to 10.9, every integer to 64, then sparser to 4096.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.01, 1.02, 1.03, 1.05, 1.075]
    + [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 65)]
    + [72.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 224.0, 256.0, 320.0, 384.0, 448.0, 512.0]
    + [640.0, 768.0, 1024.0, 1536.0, 2048.0, 3072.0, 4096.0]
)


def _as_orders(orders: np.ndarray | tuple[float, ...]) -> np.ndarray:
    return np.asarray(orders, dtype=np.float64)


def _is_integer(orders: np.ndarray) -> np.ndarray:
    return orders == np.round(orders)


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """log(e^x − 1) for x > 0 without overflow."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        return np.where(x > 30.0, x + np.log1p(-np.exp(-np.minimum(x, 700.0))), np.log(np.expm1(np.minimum(x, 30.0))))


@dataclass(frozen=True)
class _BinomialTerms:
    """Flattened (α, k) pairs, k = first..α, of a set of integer orders, with log C(α, k) precomputed."""

    alpha: np.ndarray
    k: np.ndarray
    k_index: np.ndarray
    log_binom: np.ndarray
    segment: np.ndarray
    starts: np.ndarray

    def logsumexp(self, values: np.ndarray) -> np.ndarray:
        """logsumexp of ``values`` (one per pair) within each order's segment."""
        peaks = np.maximum.reduceat(values, self.starts)
        return peaks + np.log(np.add.reduceat(np.exp(values - peaks[self.segment]), self.starts))


@lru_cache(maxsize=64)
def _binomial_terms(orders: tuple[float, ...], first: int) -> _BinomialTerms:
    a = np.asarray(orders, dtype=np.float64)
    counts = (a - first + 1).astype(np.int64)
    segment = np.repeat(np.arange(a.size), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k_index = np.arange(segment.size) - starts[segment] + first
    alpha_index = a.astype(np.int64)[segment]
    table = gammaln(np.arange(int(a.max()) + 1, dtype=np.float64) + 1.0)
    log_binom = table[alpha_index] - table[k_index] - table[alpha_index - k_index]
    return _BinomialTerms(a[segment], k_index.astype(np.float64), k_index, log_binom, segment, starts)


def gaussian_rdp(noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """ε(α) = α / (2σ²) (Mironov 2017, Prop. 7)."""
    return _as_orders(orders) / (2.0 * noise_multiplier**2)


def laplace_rdp(noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """ε(α) = log(α/(2α−1)·e^{(α−1)/b} + (α−1)/(2α−1)·e^{−α/b}) / (α−1) (Mironov 2017, Prop. 6)."""
    a = _as_orders(orders)
    b = noise_multiplier
    log_sum = np.logaddexp(np.log(a / (2 * a - 1)) + (a - 1) / b, np.log((a - 1) / (2 * a - 1)) - a / b)
    return log_sum / (a - 1)


def randomized_response_rdp(epsilon: float, orders: np.ndarray) -> np.ndarray:
    """RDP of ε-randomized response, an upper bound for every ε-DP mechanism (Kairouz, Oh & Viswanath 2015).

    D_α = log(p^α (1−p)^{1−α} + (1−p)^α p^{1−α}) / (α−1) with p = e^ε / (1 + e^ε).
    """
    a = _as_orders(orders)
    log_p = -np.logaddexp(0.0, -epsilon)
    log_1mp = -np.logaddexp(0.0, epsilon)
    both = np.logaddexp(a * log_p + (1 - a) * log_1mp, a * log_1mp + (1 - a) * log_p)
    return np.minimum(both / (a - 1), epsilon)


# ---------------------------------------------------------------------------------------------------
# Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019)
# ---------------------------------------------------------------------------------------------------


def _sgm_log_a_minus_1_integer(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log(A_α − 1) for integer α ≥ 2 by the binomial expansion (MTZ 2019, §3.2).

    A_α = Σ_k C(α,k) q^k (1−q)^{α−k} e^{(k²−k)/(2σ²)} and the binomial weights sum to 1, hence
    A_α − 1 = Σ_{k≥2} C(α,k) q^k (1−q)^{α−k} (e^{(k²−k)/(2σ²)} − 1): a sum of positive terms.
    """
    pairs = _binomial_terms(tuple(orders.tolist()), 2)
    ks = np.arange(int(orders.max()) + 1, dtype=np.float64)
    log_gain = _log_expm1((ks * ks - ks) / (2.0 * sigma**2))  # log(e^{(k²−k)/(2σ²)} − 1), k = 0..max α
    k = pairs.k
    return pairs.logsumexp(pairs.log_binom + k * math.log(q) + (pairs.alpha - k) * math.log1p(-q) + log_gain[pairs.k_index])


def _log_excess(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """log((1+x)^α − 1 − αx) for x > −1, α > 1 (broadcast); the argument of the log is ≥ 0 by convexity.

    Three regimes, each free of cancellation: a Taylor series for |αx| small, a difference of logs when
    1+αx > 0, and a sum of two non-negative terms when 1+αx ≤ 0.
    """
    x, alpha = np.broadcast_arrays(x, alpha)
    with np.errstate(all="ignore"):
        # 1 + αx > 0 (the usual case): (1+x)^α − (1+αx) = (1+x)^α (1 − e^r), r = log(1+αx) − α log(1+x) ≤ 0.
        log_grow = alpha * np.log1p(x)
        out = log_grow + np.log(-np.expm1(np.log1p(alpha * x) - log_grow))
        # 1 + αx ≤ 0 (so x < 0): both (1+x)^α and −(1+αx) are ≥ 0.
        negative = 1 + alpha * x <= 0
        if negative.any():
            xn, a_n = x[negative], alpha[negative]
            out[negative] = np.logaddexp(a_n * np.log1p(xn), np.log(-1 - a_n * xn))
        # |αx| small: Σ_{k≥2} C(α,k) x^k = C(α,2) x² (1 + r₂ + r₂r₃ + …), r_k = (α−k)/(k+1)·x.
        small = np.abs(x) * np.maximum(alpha, 2.0) < 1e-3
        if small.any():
            xs, a_s = x[small], alpha[small]
            ratio, total = np.ones_like(xs), np.ones_like(xs)
            for k in range(2, 9):
                ratio = ratio * (a_s - k) / (k + 1) * xs
                total = total + ratio
            out[small] = np.log(a_s * (a_s - 1) / 2) + 2 * np.log(np.abs(xs)) + np.log(total)
    return out


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    peak = values.max(axis=1)
    return peak + np.log(np.exp(values - peak[:, None]).sum(axis=1))


def _sgm_log_a_minus_1_fractional(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log(A_α − 1) for any real α > 1 by quadrature of MTZ 2019's integral.

    A_α − 1 = E_{z∼N(0,σ²)}[(1+x)^α − 1 − αx] with x = q(e^{(2z−1)/(2σ²)} − 1), since E[x] = 0; the
    integrand is ≥ 0. It is analytic in the strip |Im z| < πσ², so the trapezoidal rule with step
    h = min(σ, σ²)/4 converges geometrically (error ≲ e^{-60} relative); the mass lies within 14σ of
    [0, max(α, 2)], where the window is cut (tails ≲ e^{-98}).
    """
    lo, hi, h = _quadrature_window(sigma, orders)
    z = np.linspace(lo, hi, int(math.ceil((hi - lo) / h)) + 1)
    h = z[1] - z[0]
    w = (2.0 * z - 1.0) / (2.0 * sigma**2)
    x = q * np.expm1(np.minimum(w, 700.0))
    log_weight = -0.5 * (z / sigma) ** 2 - math.log(sigma * math.sqrt(2.0 * math.pi)) + math.log(h)
    excess = _log_excess(x[None, :], orders[:, None])
    huge = w > 700.0
    if huge.any():  # there (1+x)^α dominates; use the exact log(1+x) = log(1−q+q e^w)
        log1p_x = np.logaddexp(math.log1p(-q), math.log(q) + w[huge])
        excess[:, huge] = orders[:, None] * log1p_x[None, :]
    return _logsumexp_rows(excess + log_weight[None, :])


def subsampled_gaussian_rdp(sample_rate: float, noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """RDP of the Poisson-subsampled Gaussian mechanism, exact (Mironov, Talwar & Zhang 2019, §3)."""
    a = _as_orders(orders)
    if sample_rate == 1.0:
        return gaussian_rdp(noise_multiplier, a)
    integer = _is_integer(a)
    fractional = ~integer
    if fractional.any() and _quadrature_points(noise_multiplier, a[fractional]) > QUADRATURE_MAX_POINTS:
        # Very small σ: the quadrature grid would be huge; bound fractional orders from the exact integer ones.
        return _interpolate_fractional(a, lambda ints: subsampled_gaussian_rdp(sample_rate, noise_multiplier, ints))
    log_a_minus_1 = np.empty_like(a)
    if integer.any():
        log_a_minus_1[integer] = _sgm_log_a_minus_1_integer(sample_rate, noise_multiplier, a[integer])
    if fractional.any():
        log_a_minus_1[fractional] = _sgm_log_a_minus_1_fractional(sample_rate, noise_multiplier, a[fractional])
    return np.logaddexp(0.0, log_a_minus_1) / (a - 1)


#: Most quadrature points for fractional orders (σ ≳ 0.03); below, they are bounded from the integer orders.
QUADRATURE_MAX_POINTS = 50_000


def _quadrature_window(sigma: float, orders: np.ndarray) -> tuple[float, float, float]:
    """(lo, hi, step) of the trapezoid grid used by :func:`_sgm_log_a_minus_1_fractional`."""
    return -14.0 * sigma, max(float(orders.max()), 2.0) + 14.0 * sigma, min(sigma, sigma * sigma) / 4.0


def _quadrature_points(sigma: float, orders: np.ndarray) -> float:
    lo, hi, h = _quadrature_window(sigma, orders)
    return (hi - lo) / h


def _interpolate_fractional(orders: np.ndarray, integer_rdp: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """RDP at any orders from exact values at integers, upper-bounding fractional orders by convexity.

    Between integers m < α < m+1 the cumulant (α−1)ε(α) is convex (van Erven & Harremoës 2014, Thm. 11) and 0 at
    α = 1, so (α−1)ε(α) ≤ (m+1−α)(m−1)ε(m) + (α−m)·m·ε(m+1).
    """
    lower = np.floor(orders)
    needed = np.unique(np.concatenate([lower[lower >= 2], np.ceil(orders)])).astype(np.float64)
    needed = needed[needed >= 2]
    at = dict(zip(needed.tolist(), integer_rdp(needed).tolist()))
    result = np.empty_like(orders)
    for i, alpha in enumerate(orders.tolist()):
        m = math.floor(alpha)
        if m == alpha:
            result[i] = at[alpha]
            continue
        cgf_low = 0.0 if m == 1 else (m - 1) * at[float(m)]
        cgf_high = m * at[float(m + 1)]
        result[i] = ((m + 1 - alpha) * cgf_low + (alpha - m) * cgf_high) / (alpha - 1)
    return result


# ---------------------------------------------------------------------------------------------------
# Poisson-subsampled general mechanism (Zhu & Wang 2019)
# ---------------------------------------------------------------------------------------------------


def _zhu_wang_integer(q: float, base_rdp: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Zhu & Wang 2019, Thm. 6, at integer orders α ≥ 2; ``base_rdp[j]`` is the base mechanism's ε(j+2).

    With K ∼ Binomial(α, q): e^{(α−1)ε(α)} ≤ P(K≤1) + P(K=2) e^{ε(2)} + 3 Σ_{l≥3} P(K=l) e^{(l−1)ε(l)},
    so the excess over 1 is P(K=2)(e^{ε(2)} − 1) + Σ_{l≥3} P(K=l)(3e^{(l−1)ε(l)} − 1) ≥ 0.
    """
    pairs = _binomial_terms(tuple(orders.tolist()), 2)
    l = pairs.k
    cgf = (l - 1) * base_rdp[pairs.k_index - 2]
    with np.errstate(divide="ignore"):
        factor = np.where(
            l == 2,
            _log_expm1(np.maximum(cgf, 1e-300)),
            math.log(3.0) + cgf + np.log1p(-np.exp(-cgf) / 3.0),
        )
    log_prob = pairs.log_binom + l * math.log(q) + (pairs.alpha - l) * math.log1p(-q)
    excess = pairs.logsumexp(log_prob + factor)
    return np.logaddexp(0.0, excess) / (orders - 1)


def subsampled_rdp_upper_bound(sample_rate: float, base: Event, orders: np.ndarray) -> np.ndarray:
    """RDP upper bound of ``base`` under Poisson sampling from its RDP curve (Zhu & Wang 2019, Thm. 6).

    Integer orders use the theorem directly. A fractional α between integers m < α < m+1 uses
    convexity of the cumulant (α−1)ε(α) (van Erven & Harremoës 2014, Thm. 11), with (α−1)ε(α) = 0 at α = 1:
    (α−1)ε(α) ≤ (m+1−α)(m−1)ε(m) + (α−m)·m·ε(m+1).
    """
    a = _as_orders(orders)

    def integer_orders(ints: np.ndarray) -> np.ndarray:
        return _zhu_wang_integer(sample_rate, rdp_curve(base, np.arange(2.0, ints.max() + 1.0)), ints)

    return _interpolate_fractional(a, integer_orders)


# ---------------------------------------------------------------------------------------------------
# Dispatch over events
# ---------------------------------------------------------------------------------------------------


def _effective_gaussian(event: Event) -> float | None:
    """σ of the single Gaussian equivalent to a composition of Gaussians on the same data, else None.

    Gaussians with noise multipliers σ_i on one batch form one Gaussian query with
    σ = (Σ σ_i⁻²)^{−1/2} (Mironov 2017, Prop. 7 on the stacked query; Andrew et al. 2021, §3.1).
    """
    if isinstance(event, Gaussian):
        return event.noise_multiplier
    if isinstance(event, Composed):
        inverse_sq = 0.0
        for inner in event.events:
            sigma = _effective_gaussian(inner)
            if sigma is None:
                return None
            inverse_sq += sigma**-2
        return (event.count * inverse_sq) ** -0.5
    return None


def pure_epsilon(event: Event) -> float:
    """ε such that ``event`` is ε-DP (math.inf if it is not pure DP, e.g. anything Gaussian).

    Laplace(b): 1/b (Dwork et al. 2006); Poisson sampling: log(1 + q(e^ε − 1)) (Li, Qardaji & Su 2012,
    Thm. 1; add/remove form in Balle, Barthe & Gaboardi 2018, Thm. 8); composition adds.
    """
    if isinstance(event, (Gaussian, NonPrivate)):
        return math.inf
    if isinstance(event, Laplace):
        return 1.0 / event.noise_multiplier
    if isinstance(event, PoissonSampled):
        inner = pure_epsilon(event.mechanism)
        if math.isinf(inner):
            return math.inf
        q = event.sample_rate
        if inner < 700:  # log1p(q·expm1(ε)): accurate (and ≥ 0) down to the tiniest ε, rounded up by one ulp
            return math.nextafter(math.log1p(q * math.expm1(inner)), math.inf)
        # log(1 − q + q e^ε) in log space: e^ε overflows for ε > 709 (e.g. Laplace with a tiny b).
        return float(np.logaddexp(math.log1p(-q) if q < 1 else -math.inf, math.log(q) + inner))
    if isinstance(event, Composed):
        return event.count * sum(pure_epsilon(e) for e in event.events)
    raise TypeError(f"not an accountants event: {event!r}")


def _normalise(event: Event) -> Event:
    """Merge nested samplings (Poisson of Poisson is Poisson with the product rate) and drop q = 1."""
    if isinstance(event, PoissonSampled):
        inner = _normalise(event.mechanism)
        if isinstance(inner, PoissonSampled):
            return _normalise(PoissonSampled(event.sample_rate * inner.sample_rate, inner.mechanism))
        return inner if event.sample_rate == 1.0 else PoissonSampled(event.sample_rate, inner)
    if isinstance(event, Composed):
        return Composed([_normalise(e) for e in event.events], event.count)
    return event


def _raw_curve(event: Event, orders: np.ndarray) -> np.ndarray:
    if isinstance(event, NonPrivate):
        return np.full(len(orders), math.inf)
    if isinstance(event, Gaussian):
        return gaussian_rdp(event.noise_multiplier, orders)
    if isinstance(event, Laplace):
        return laplace_rdp(event.noise_multiplier, orders)
    if isinstance(event, Composed):
        sigma = _effective_gaussian(event)
        if sigma is not None:
            return gaussian_rdp(sigma, orders)
        return event.count * sum(rdp_curve(e, orders) for e in event.events)
    if isinstance(event, PoissonSampled):
        sigma = _effective_gaussian(event.mechanism)
        if sigma is not None:
            return subsampled_gaussian_rdp(event.sample_rate, sigma, orders)
        return subsampled_rdp_upper_bound(event.sample_rate, event.mechanism, orders)
    raise TypeError(f"not an accountants event: {event!r}")


@lru_cache(maxsize=512)
def _cached_curve(event: Event, orders: tuple[float, ...]) -> np.ndarray:
    a = np.asarray(orders, dtype=np.float64)
    event = _normalise(event)
    curve = _raw_curve(event, a)
    eps = pure_epsilon(event)
    if math.isfinite(eps):
        curve = np.minimum(curve, randomized_response_rdp(eps, a))
    curve = np.maximum(curve, 0.0)
    curve.setflags(write=False)
    return curve


def rdp_curve(event: Event, orders: np.ndarray | tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
    """Upper bound on the RDP ε(α) of one run of ``event`` at each order α > 1 (read-only array)."""
    key = tuple(float(a) for a in np.asarray(orders, dtype=np.float64).ravel())
    return _cached_curve(event, key)


def clear_cache() -> None:
    """Forget memoised curves (used by benchmarks to time cold computations)."""
    _cached_curve.cache_clear()
