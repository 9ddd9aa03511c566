"""Planning a budget: noise for a target ε, steps that fit a budget, (q, steps) from a training plan."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from typing import Literal

import numpy as np

from .checks import (
    MAX_STEPS,
    check_count,
    check_delta,
    check_positive,
    check_sample_rate,
)
from .errors import PrivacyParameterError
from .events import Event, Gaussian, Laplace, PoissonSampled
from .factory import AccountantName, make_accountant

__all__ = [
    "Mechanism",
    "SamplingPlan",
    "calibrate_noise",
    "epochs_to_steps",
    "noise_multiplier_for",
    "sampling_plan",
    "step_event",
    "steps_for",
    "steps_per_epoch",
]

Mechanism = Literal["gaussian", "laplace"]

SIGMA_FLOOR = 1e-3
_SIGMA_CEILING = 1e7


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling rate and number of steps of a training plan."""

    sample_rate: float
    steps: int


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch of Poisson sampling at rate q: ⌈1/q⌉ (each step reads q·N examples on average)."""
    inverse = 1.0 / check_sample_rate(sample_rate)
    if inverse > MAX_STEPS:
        raise PrivacyParameterError(
            f"one epoch at sample_rate={sample_rate:g} is {inverse:.3g} steps, more than the {MAX_STEPS:,} an "
            "accountant composes; raise the sample rate (batch size / dataset size) or give a number of steps"
        )
    return math.ceil(inverse - 1e-9)


def epochs_to_steps(epochs: float, sample_rate: float) -> int:
    """Number of steps in ``epochs`` epochs: ⌈epochs · ⌈1/q⌉⌉ (rounded up, so ε is never under-reported)."""
    total = check_positive("epochs", epochs) * steps_per_epoch(sample_rate)
    if total > MAX_STEPS:
        raise PrivacyParameterError(
            f"epochs={epochs:g} at sample_rate={sample_rate:g} is {total:.3g} steps, more than the {MAX_STEPS:,} "
            "an accountant composes; plan fewer epochs"
        )
    return max(1, math.ceil(total - 1e-9))


def sampling_plan(dataset_size: int, batch_size: int, epochs: float) -> SamplingPlan:
    """q = batch_size / dataset_size (the expected batch size under Poisson sampling) and the steps of ``epochs``."""
    n = check_count("dataset_size", dataset_size)
    b = check_count("batch_size", batch_size)
    if b > n:
        raise PrivacyParameterError(f"batch_size ({b}) must not exceed dataset_size ({n})")
    return SamplingPlan(sample_rate=b / n, steps=epochs_to_steps(epochs, b / n))


def step_event(sample_rate: float, noise_multiplier: float, mechanism: Mechanism = "gaussian") -> Event:
    """The event of one DP-SGD step: Gaussian or Laplace noise on a Poisson sample."""
    if mechanism == "gaussian":
        base: Event = Gaussian(noise_multiplier)
    elif mechanism == "laplace":
        base = Laplace(noise_multiplier)
    else:
        raise PrivacyParameterError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    return PoissonSampled(sample_rate, base)


def _epsilon(
    event: Event, steps: int, delta: float, orders: Sequence[float] | None, accountant: AccountantName
) -> float:
    tracker = make_accountant(accountant, orders=orders)
    tracker.compose(event, steps)
    return tracker.get_epsilon(delta)


def _narrow(
    epsilon: Callable[[float], float],
    target: float,
    good: float,
    bad: float,
    eps_good: float,
    eps_bad: float,
    tight: Callable[[float, float], bool],
    snap: Callable[[float, float, float], float],
    resolution: float,
) -> float:
    """Shrink a bracket with ε(good) ≤ target < ε(bad) (ε monotone between) until ``tight(good, bad)``.

    Brent's method (scipy.optimize.brentq: bisection, secant and inverse quadratic steps; Brent 1973, ch. 4) on
    log ε − log target over log x, where ε is smooth and nearly linear, recording the tightest bracket seen and
    stopping as soon as it is tight; bisection then finishes whatever brentq left. Brent's steps are at least
    ``resolution`` (in log x), a bit under the width ``tight`` accepts, so that a good estimate closes the
    bracket in one or two probes. ``snap(x, good, bad)`` maps a probe to an admissible point strictly inside the
    bracket (e.g. an integer). Returns ``good``, whose ε was computed and is ≤ target.
    """
    from scipy.optimize import brentq  # here, not at the top: it adds ~0.2 s to `import accountants`

    log_target = math.log(target)

    def f(value: float) -> float:
        return min(max(math.log(value) if value > 0 else -1e3, -1e3), 1e3) - log_target

    def done() -> bool:
        return tight(good, bad)

    def probe(x: float) -> float:
        nonlocal good, bad
        x = snap(x, good, bad)
        value = epsilon(x)
        if value <= target:
            good = x
        else:
            bad = x
        return f(value)

    known = {math.log(good): f(eps_good), math.log(bad): f(eps_bad)}
    if not done():
        a, b = sorted(known)
        brentq(
            lambda u: known[u] if u in known else (0.0 if done() else probe(math.exp(u))),  # 0: tight, stop
            a, b, xtol=resolution, rtol=4 * np.finfo(float).eps, maxiter=100, disp=False,
        )
    while not done():
        probe(math.sqrt(good * bad))  # snapped strictly inside: every probe shrinks the bracket
    return good


def _inside(x: float, a: float, b: float) -> float:
    """``x`` if strictly between a and b, else their geometric mean."""
    lo, hi = min(a, b), max(a, b)
    return x if lo < x < hi else math.sqrt(lo * hi)


def _inside_integer(x: float, a: float, b: float) -> float:
    """The integer nearest ``x`` if strictly between the integers a and b, else their midpoint."""
    lo, hi = int(min(a, b)), int(max(a, b))
    n = int(round(x))
    return n if lo < n < hi else (lo + hi) // 2


def calibrate_noise(
    event_for: Callable[[float], Event],
    target_epsilon: float,
    delta: float,
    steps: int,
    orders: Sequence[float] | None = None,
    rtol: float = 1e-4,
    accountant: AccountantName = "pld",
) -> float:
    """Smallest noise multiplier σ (to relative tolerance ``rtol``) with ε(event_for(σ) × steps) ≤ target.

    Bracketing in log σ, then Brent's method on log ε(log σ) (see :func:`_narrow`); the returned σ is the
    upper end of the final bracket, whose ε was computed and is ≤ target — a guarantee, whatever the curve's
    numerical monotonicity. ``accountant`` ("rdp" or "pld", see :func:`~accountants.make_accountant`) says
    whose ε must meet the target; for "pld" the search starts at RDP's σ, so it never returns a larger one.
    The search stops below σ = :data:`SIGMA_FLOOR`: a target met there returns a σ under 4 × that floor, which
    meets the target but need not be the smallest that does.
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    steps = check_count("steps", steps, maximum=MAX_STEPS)
    if not (isinstance(rtol, Real) and not isinstance(rtol, bool) and 1e-12 <= rtol <= 0.5):
        raise PrivacyParameterError(f"rtol (the relative tolerance on σ) must be a number in [1e-12, 0.5], got {rtol!r}")
    make_accountant(accountant, orders=orders)  # validate the name (and orders) before searching

    def eps(sigma: float) -> float:
        return _epsilon(event_for(sigma), steps, delta, orders, accountant)

    hi, factor = 1.0, 4.0
    if accountant != "rdp":
        # Start below RDP's σ when it already meets the target here (it always does for "pld", which is never
        # looser than RDP): the σ returned is then never larger than RDP's.
        try:
            hi, factor = calibrate_noise(event_for, target, delta, steps, rtol=rtol, accountant="rdp"), 1.25
        except PrivacyParameterError:  # unreachable by RDP: search from scratch
            pass
    eps_hi = eps(hi)
    while eps_hi > target:
        hi *= factor
        if hi > _SIGMA_CEILING:
            raise PrivacyParameterError(
                f"target_epsilon={target:g} is unreachable at delta={delta:g} with {steps} steps even with a "
                f"noise multiplier of {_SIGMA_CEILING:g}; raise target_epsilon or delta, or take fewer steps"
            )
        eps_hi = eps(hi)
    lo = hi / factor
    eps_lo = eps(lo)
    while eps_lo <= target:
        factor = min(factor * factor, 4.0)  # from RDP's σ: small steps first, then faster
        hi, eps_hi, lo = lo, eps_lo, lo / factor
        if lo < SIGMA_FLOOR:
            return hi
        eps_lo = eps(lo)
    tight = lambda good, bad: good / bad - 1.0 <= rtol  # noqa: E731 - the bracket [bad, good] is within rtol
    return _narrow(eps, target, hi, lo, eps_hi, eps_lo, tight, _inside, 0.45 * math.log1p(rtol))


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Mechanism = "gaussian",
    orders: Sequence[float] | None = None,
    accountant: AccountantName = "pld",
) -> float:
    """Smallest σ (Gaussian: std / L2 sensitivity; Laplace: scale / L1 sensitivity) reaching ``target_epsilon``.

    The result is guaranteed to give ε ≤ target_epsilon, by ``accountant``'s ε ("rdp" or "pld"), for
    ``steps`` Poisson-sampled steps at rate q. The default "pld" is the training engine's and the CLI's default accountant.
    """
    q = check_sample_rate(sample_rate)
    step_event(q, 1.0, mechanism)  # validate the mechanism name before searching
    return calibrate_noise(
        lambda sigma: step_event(q, sigma, mechanism), target_epsilon, delta, steps, orders, accountant=accountant
    )


def steps_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    mechanism: Mechanism = "gaussian",
    orders: Sequence[float] | None = None,
    max_steps: int = MAX_STEPS,
    accountant: AccountantName = "pld",
) -> int:
    """Largest number of steps T ≤ ``max_steps`` with ε(T) ≤ target_epsilon (0 if not even one step fits).

    ε is ``accountant``'s ("rdp" or "pld"); every T returned had its ε computed and found ≤ target. For
    another accountant than "rdp" the search starts from RDP's answer when it fits (it always does for "pld",
    never looser than RDP), so it never returns fewer steps than RDP.
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    event = step_event(check_sample_rate(sample_rate), noise_multiplier, mechanism)
    max_steps = check_count("max_steps", max_steps, maximum=MAX_STEPS)
    tracker = make_accountant(accountant, orders=orders)

    @lru_cache(maxsize=None)
    def epsilon(steps: float) -> float:
        return tracker.get_epsilon_after(event, delta, int(steps))

    lo = 1
    if accountant != "rdp":
        rdp_steps = steps_for(target, delta, sample_rate, noise_multiplier, mechanism, None, max_steps, "rdp")
        if rdp_steps > 1 and epsilon(rdp_steps) <= target:
            lo = rdp_steps
    if epsilon(lo) > target:
        return 0
    while True:  # invariant: ε(lo) ≤ target
        if lo >= max_steps:
            return max_steps
        hi = min(2 * lo, max_steps)
        if epsilon(hi) > target:
            break
        lo = hi
    return int(_narrow(epsilon, target, lo, hi, epsilon(lo), epsilon(hi), lambda good, bad: bad - good <= 1,
                       _inside_integer, 0.45 * math.log1p(1 / hi)))
