"""Exceptions and warnings raised by the accountants (import them from here or from :mod:`accountants`)."""

from __future__ import annotations

__all__ = ["PrivacyParameterError", "PrivacyWarning", "UnsupportedEventError"]


class PrivacyParameterError(ValueError):
    """A privacy parameter (σ, q, δ, ε, a count, ...) is outside its valid range.

    The message names the argument, the value received and the valid range.
    """


class UnsupportedEventError(PrivacyParameterError):
    """An accountant cannot interpret this event (the RDP accountant may: it has general bounds)."""


class PrivacyWarning(UserWarning):
    """A setting is valid but weakens the privacy guarantee (e.g. δ ≥ 1/dataset size)."""
