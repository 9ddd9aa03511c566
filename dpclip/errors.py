"""Exceptions raised by dpclip; each message says what went wrong and how to fix it."""

from accountants import PrivacyParameterError


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than the privacy budget; nothing was read or changed."""


class ModelNotSupportedError(ValueError):
    """dpclip cannot guarantee exact per-example clipping for this model, so it trains on nothing: a layer that
    mixes examples (BatchNorm, a batch-wide reduction), a fused recurrent layer (use ``fix_model``), a layer a rule
    refuses (``Embedding(max_norm)``, sparse gradients), a model that failed verification or a per-example path
    on a batch, or nothing to train. The message names the layer and the fix."""


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
