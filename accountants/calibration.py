"""Planning a budget: noise for a target ε, steps that fit a budget, (q, steps) from a training plan."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ._validation import (
    PrivacyParameterError,
    check_count,
    check_delta,
    check_positive,
    check_sample_rate,
)
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

_SIGMA_FLOOR = 1e-3
_SIGMA_CEILING = 1e7


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling rate and number of steps of a training plan."""

    sample_rate: float
    steps: int


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch of Poisson sampling at rate q: ⌈1/q⌉ (each step reads q·N examples on average)."""
    return math.ceil(1.0 / check_sample_rate(sample_rate) - 1e-9)


def epochs_to_steps(epochs: float, sample_rate: float) -> int:
    """Number of steps in ``epochs`` epochs: ⌈epochs · ⌈1/q⌉⌉ (rounded up, so ε is never under-reported)."""
    return max(1, math.ceil(check_positive("epochs", epochs) * steps_per_epoch(sample_rate) - 1e-9))


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


def calibrate_noise(
    event_for: Callable[[float], Event],
    target_epsilon: float,
    delta: float,
    steps: int,
    orders: Sequence[float] | None = None,
    rtol: float = 1e-4,
    accountant: AccountantName = "rdp",
) -> float:
    """Smallest noise multiplier σ (to relative tolerance ``rtol``) with ε(event_for(σ) × steps) ≤ target.

    Bracketing in log σ, then bisection; the returned σ is the upper end of the final bracket, whose ε was
    computed and is ≤ target — a guarantee, whatever the curve's numerical monotonicity. ``accountant``
    ("rdp" or "pld", see :func:`~accountants.make_accountant`) says whose ε must meet the target.
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    steps = check_count("steps", steps)
    make_accountant(accountant, orders=orders)  # validate the name (and orders) before searching

    def eps(sigma: float) -> float:
        return _epsilon(event_for(sigma), steps, delta, orders, accountant)

    hi = 1.0
    while eps(hi) > target:
        hi *= 4.0
        if hi > _SIGMA_CEILING:
            raise PrivacyParameterError(
                f"target_epsilon={target:g} is unreachable at delta={delta:g} with {steps} steps even with a "
                f"noise multiplier of {_SIGMA_CEILING:g}; raise target_epsilon or delta, or take fewer steps"
            )
    lo = hi / 4.0
    while eps(lo) <= target:
        hi, lo = lo, lo / 4.0
        if lo < _SIGMA_FLOOR:
            return hi
    while hi / lo - 1.0 > rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Mechanism = "gaussian",
    orders: Sequence[float] | None = None,
    accountant: AccountantName = "rdp",
) -> float:
    """Smallest σ (Gaussian: std / L2 sensitivity; Laplace: scale / L1 sensitivity) reaching ``target_epsilon``.

    The result is guaranteed to give ε ≤ target_epsilon, by ``accountant``'s ε ("rdp" or "pld"), for
    ``steps`` Poisson-sampled steps at rate q. The default "rdp" matches the training engine's accountant.
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
    max_steps: int = 10**12,
    accountant: AccountantName = "rdp",
) -> int:
    """Largest number of steps T ≤ ``max_steps`` with ε(T) ≤ target_epsilon (0 if not even one step fits).

    ε is ``accountant``'s ("rdp" or "pld"); every T returned had its ε computed and found ≤ target.
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    event = step_event(check_sample_rate(sample_rate), check_positive("noise_multiplier", noise_multiplier), mechanism)
    tracker = make_accountant(accountant, orders=orders)

    def fits(steps: int) -> bool:
        return tracker.get_epsilon_after(event, delta, steps) <= target

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if lo >= max_steps:
            return max_steps
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
