"""Choosing an accountant by name: ``make_accountant("rdp")`` or ``make_accountant("pld")``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

from .base import Accountant
from .errors import PrivacyParameterError
from .pld_accountant import PLDAccountant
from .rdp_accountant import RDPAccountant

__all__ = ["ACCOUNTANTS", "AccountantName", "Accountant", "make_accountant"]

AccountantName = Literal["rdp", "pld"]

#: The accountants by name. "rdp": Rényi DP (Mironov 2017), fast, closed-form curves, slightly loose;
#: "pld": privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), near-exact, slower.
ACCOUNTANTS: dict[str, type[Accountant]] = {"rdp": RDPAccountant, "pld": PLDAccountant}


def make_accountant(name: str = "pld", *, orders: Sequence[float] | None = None, **options: Any) -> Accountant:
    """A fresh accountant ``ACCOUNTANTS[name](**options)`` ("rdp": ``orders``; "pld": value_discretization_interval...).

    Every accountant has the :class:`~accountants.base.Accountant` interface (compose, history, steps,
    epsilon_result, get_epsilon, get_epsilon_after, get_delta, state_dict / load_state_dict, summary).
    An unknown name, or an option the named accountant does not take, raises PrivacyParameterError.
    """
    try:
        cls = ACCOUNTANTS[name]
    except (KeyError, TypeError):
        raise PrivacyParameterError(
            f"accountant must be one of {', '.join(repr(n) for n in ACCOUNTANTS)}, got {name!r}"
        ) from None
    if orders is not None:
        options["orders"] = orders
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PrivacyParameterError(
            f"options {unknown} do not apply to the {name!r} accountant ({cls.__name__} takes "
            f"{', '.join(accepted) or 'no options'})"
        )
    return cls(**options)
