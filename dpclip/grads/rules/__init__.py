"""Layer rules, one module per layer family; importing this package registers them all."""

from . import attention, conv, embedding, fallback, linear, norms, recurrent  # noqa: F401

__all__ = ["attention", "conv", "embedding", "fallback", "linear", "norms", "recurrent"]
