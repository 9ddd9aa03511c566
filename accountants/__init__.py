"""Privacy accounting for DP-SGD: mechanisms as data, RDP and PLD accountants, calibration, a budget CLI.

Depends on numpy and scipy only (never torch), so it can plan budgets anywhere.
"""

from .base import Accountant, EpsilonResult
from .errors import PrivacyParameterError, PrivacyWarning, UnsupportedEventError
from .calibration import (
    SamplingPlan,
    calibrate_noise,
    epochs_to_steps,
    noise_multiplier_for,
    sampling_plan,
    step_event,
    steps_for,
    steps_per_epoch,
)
from .events import Composed, Event, Gaussian, Laplace, NonPrivate, PoissonSampled, event_from_dict
from .factory import ACCOUNTANTS, make_accountant
from .pld_accountant import PLDAccountant
from .rdp import DEFAULT_ORDERS, rdp_curve
from .rdp_accountant import HistoryEntry, RDPAccountant
from .statement import privacy_statement

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "DEFAULT_ORDERS",
    "Composed",
    "EpsilonResult",
    "Event",
    "Gaussian",
    "HistoryEntry",
    "Laplace",
    "NonPrivate",
    "PLDAccountant",
    "PoissonSampled",
    "PrivacyParameterError",
    "PrivacyWarning",
    "RDPAccountant",
    "SamplingPlan",
    "UnsupportedEventError",
    "calibrate_noise",
    "epochs_to_steps",
    "event_from_dict",
    "make_accountant",
    "noise_multiplier_for",
    "privacy_statement",
    "rdp_curve",
    "sampling_plan",
    "step_event",
    "steps_for",
    "steps_per_epoch",
]
