"""Argument checks shared by the accountants (and dpclip): one place that says what a valid value is.

Every check returns the value converted (float or int) or raises :class:`~accountants.errors.PrivacyParameterError`
with a message naming the argument, the value received and the valid range.
"""

from __future__ import annotations

import math
import numbers
import warnings

from .errors import PrivacyParameterError, PrivacyWarning

#: Largest number of runs of one event an accountant composes (counts, Composed counts and whole histories):
#: a trillion steps, far beyond any training run; past it PLD truncation alone would exceed useful δ.
MAX_STEPS = 10**12
#: Noise multipliers the accountants accept (σ² and 1/σ² must stay far inside double precision).
NOISE_MULTIPLIER_RANGE = (1e-100, 1e100)

__all__ = [
    "MAX_STEPS",
    "NOISE_MULTIPLIER_RANGE",
    "check_count",
    "check_delta",
    "check_flag",
    "check_noise_multiplier",
    "check_nonnegative",
    "check_positive",
    "check_sample_rate",
    "warn_if_delta_too_large",
]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyParameterError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise PrivacyParameterError(f"{name} must be finite, got an integer of {len(str(abs(value)))} digits") from None
    if math.isnan(value) or math.isinf(value):
        raise PrivacyParameterError(f"{name} must be finite, got {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number > 0."""
    value = _real(name, value)
    if value <= 0:
        raise PrivacyParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number ≥ 0."""
    value = _real(name, value)
    if value < 0:
        raise PrivacyParameterError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_sample_rate(value: object, name: str = "sample_rate") -> float:
    """Return the Poisson sampling rate q if it lies in (0, 1]."""
    value = _real(name, value)
    if not 0 < value <= 1:
        raise PrivacyParameterError(f"{name} must lie in (0, 1], got {value!r}")
    return value


def check_delta(value: object, name: str = "delta") -> float:
    """Return δ if it lies in the open interval (0, 1)."""
    value = _real(name, value)
    if not 0 < value < 1:
        raise PrivacyParameterError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return value


def _short(value: int) -> str:
    """An integer for a message: in full if short, else its size (a 400-digit number helps nobody)."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:3]}...({len(text.lstrip('-'))} digits)"


def check_count(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in [``minimum``, ``maximum``] (floats such as 3.0 are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PrivacyParameterError(
            f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    value = int(value)
    if value < minimum:
        raise PrivacyParameterError(f"{name} must be an integer >= {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise PrivacyParameterError(f"{name} must be an integer <= {maximum:,}, got {_short(value)}")
    return value


def check_flag(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool (numpy's too): a string such as "no" or a number would pass as truthy."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise PrivacyParameterError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_noise_multiplier(name: str, value: object) -> float:
    """Return a noise multiplier (noise scale / sensitivity) if it lies in :data:`NOISE_MULTIPLIER_RANGE`."""
    value = check_positive(name, value)
    low, high = NOISE_MULTIPLIER_RANGE
    if not low <= value <= high:
        raise PrivacyParameterError(
            f"{name} must lie in [{low:g}, {high:g}], got {value!r}; below {low:g} there is no privacy to account "
            f"(ε beyond 1e199 per step), above {high:g} none is spent"
        )
    return value


def warn_if_delta_too_large(delta: float, dataset_size: int | None) -> None:
    """Warn when δ ≥ 1/N: such a δ allows releasing one whole record outright (Dwork & Roth 2014, §2.3)."""
    if dataset_size is None:
        return
    inverse = 1.0 / dataset_size if dataset_size < 2**1000 else 0.0  # beyond the float range 1/N is 0
    if delta >= inverse:
        warnings.warn(
            f"delta={delta:g} is >= 1/dataset_size = {inverse:g}: a mechanism that publishes one "
            f"random record in full meets this (epsilon, delta). Use delta well below 1/N, e.g. 1/N^1.1 or 1e-5.",
            PrivacyWarning,
            stacklevel=3,
        )
