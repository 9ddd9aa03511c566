"""The RDP accountant: a history of events and the (ε, δ) its Rényi-DP curve implies."""

from __future__ import annotations

import math

from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

from .base import Accountant, EpsilonResult, HistoryEntry
from .checks import check_delta
from .conversion import delta_from_rdp, epsilon_from_rdp
from .errors import PrivacyParameterError
from .rdp import DEFAULT_ORDERS, pure_epsilon, rdp_curve

__all__ = ["HistoryEntry", "RDPAccountant"]


#: The largest Rényi order accepted: the sampled Gaussian's RDP at an integer order α sums α + 1 terms, and
#: orders past the defaults' 4096 only matter for ε in the thousands.
MAX_ORDER = 100_000.0


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    usage = ("orders must be a non-empty list of finite numbers > 1 (Rényi orders α, at most "
             f"{MAX_ORDER:g}; the default list suits DP-SGD)")
    if isinstance(orders, (str, bytes)) or not isinstance(orders, Iterable):
        raise PrivacyParameterError(f"{usage}, got {orders!r}")
    items = list(orders)
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in items):
        raise PrivacyParameterError(f"{usage}, got {items!r}")
    values = np.asarray(items, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 1.0) or np.any(values > MAX_ORDER):
        raise PrivacyParameterError(f"{usage}, got {items!r}")
    return tuple(float(v) for v in values)


class RDPAccountant(Accountant):
    """Tracks the privacy spent by a sequence of mechanisms through Rényi DP (Mironov 2017).

    >>> from accountants import RDPAccountant, PoissonSampled, Gaussian
    >>> acc = RDPAccountant()
    >>> acc.compose(PoissonSampled(0.01, Gaussian(1.0)), count=10_000)
    >>> round(acc.get_epsilon(1e-5), 2)
    6.71

    Heterogeneous histories (σ or q changing between steps) simply compose different events; the RDP
    curves add up (Mironov 2017, Prop. 1).
    """

    state_format = "dpclip.accountants.RDPAccountant"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        self._orders = _check_orders(DEFAULT_ORDERS if orders is None else orders)

    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    # -- privacy queries -----------------------------------------------------------------------
    def _totals(self, history: Sequence[HistoryEntry]) -> tuple[np.ndarray, float]:
        """Σ count × RDP curve (Mironov 2017, Prop. 1) and Σ count × pure ε over ``history``."""
        total = np.zeros(len(self._orders))
        pure = 0.0
        for entry in history:
            total = total + float(entry.count) * rdp_curve(entry.event, self._orders)
            pure += float(entry.count) * pure_epsilon(entry.event)
        return total, pure

    def rdp(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, total RDP at each order) of the history, e.g. to plot the RDP curve."""
        total, _ = self._totals(self._history)
        return np.asarray(self._orders), total

    def _epsilon_result(self, history: Sequence[HistoryEntry], delta: float) -> EpsilonResult:
        total, pure = self._totals(history)
        epsilon, order = epsilon_from_rdp(np.asarray(self._orders), total, delta, pure)
        return EpsilonResult(epsilon, order=order)

    def _delta(self, history: Sequence[HistoryEntry], epsilon: float) -> float:
        total, pure = self._totals(history)
        return delta_from_rdp(np.asarray(self._orders), total, epsilon, pure)[0]

    def get_epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """Smallest ε with (ε, δ)-DP for the whole history, and the Rényi order that gives it (∞: pure DP)."""
        result = self._measure(self._history, check_delta(delta))
        return result.epsilon, math.inf if result.order is None else result.order

    # -- settings ------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"orders": list(self._orders)}

    def _parse_settings(self, state: Mapping[str, Any]) -> tuple[float, ...]:
        return _check_orders(state["orders"])

    def _apply_settings(self, settings: tuple[float, ...]) -> None:
        self._orders = settings
