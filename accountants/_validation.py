"""Deprecated location: re-exports :mod:`accountants.errors` and :mod:`accountants.checks` (import from those)."""

from .checks import *  # noqa: F401,F403
from .checks import __all__ as _checks_all
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__all__ = [*_errors_all, *_checks_all]
