"""Exceptions raised by dpclip; each message says what went wrong and how to fix it."""

from accountants import PrivacyParameterError


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than the privacy budget; nothing was read or changed."""


class ModelNotSupportedError(ValueError):
    """The model has layers that mix examples within a batch (e.g. BatchNorm) or nothing to train."""


class LossNotPerExampleError(ValueError):
    """The loss does not combine per-example losses by the declared mean or sum (see :func:`dpclip.check_loss`)."""


class NonFiniteGradientError(FloatingPointError):
    """Some per-example gradients are NaN or infinite."""


class EngineUsageError(RuntimeError):
    """The engine's components were used in an order or way that would break the privacy accounting."""


__all__ = [
    "EngineUsageError",
    "LossNotPerExampleError",
    "ModelNotSupportedError",
    "NonFiniteGradientError",
    "PrivacyBudgetExceeded",
    "PrivacyParameterError",
]
