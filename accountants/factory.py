"""Choosing an accountant by name: ``make_accountant("rdp")`` or ``make_accountant("pld")``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

from ._validation import PrivacyParameterError
from .pld_accountant import PLDAccountant
from .rdp_accountant import RDPAccountant

__all__ = ["ACCOUNTANTS", "AccountantName", "Accountant", "make_accountant"]

AccountantName = Literal["rdp", "pld"]
Accountant = Union[RDPAccountant, PLDAccountant]

#: The accountants by name. "rdp": Rényi DP (Mironov 2017), fast, closed-form curves, slightly loose;
#: "pld": privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), near-exact, slower.
ACCOUNTANTS: dict[str, type] = {"rdp": RDPAccountant, "pld": PLDAccountant}


def make_accountant(name: str = "rdp", *, orders: Sequence[float] | None = None, **options: Any) -> Accountant:
    """A fresh accountant: ``"rdp"`` (RDPAccountant(orders)) or ``"pld"`` (PLDAccountant(**options)).

    Both have the same interface (compose, history, steps, get_epsilon, get_epsilon_after, get_delta,
    state_dict / load_state_dict, summary). ``orders`` applies to "rdp" only; ``options`` (e.g.
    value_discretization_interval) to "pld" only.
    """
    if name == "rdp":
        if options:
            raise PrivacyParameterError(f"options {sorted(options)} apply to the PLD accountant, not to 'rdp'")
        return RDPAccountant(orders)
    if name == "pld":
        if orders is not None:
            raise PrivacyParameterError("orders apply to the RDP accountant only, not to 'pld'")
        return PLDAccountant(**options)
    raise PrivacyParameterError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
