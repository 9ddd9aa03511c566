"""Mechanisms as plain, immutable data (in the spirit of dp_accounting's DpEvents).

An event says *what* was released, never *how much privacy* it cost: accountants interpret events.
Sensitivities are normalised to 1, so a noise multiplier is noise scale / sensitivity.
Adjacency throughout is add/remove-one-record.

    Gaussian(σ)                  x + N(0, σ²·Δ₂²·I)
    Laplace(b)                   x + Laplace(0, b·Δ₁) per coordinate
    PoissonSampled(q, m)         m run on a batch holding each record independently with probability q
    Composed([m1, m2, ...], k)   m1, m2, ... on the same data, the whole list repeated k times
    NonPrivate()                 x itself, with no noise (a debugging baseline): ε = ∞ at every δ < 1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .checks import MAX_STEPS, check_count, check_noise_multiplier, check_sample_rate
from .errors import PrivacyParameterError

__all__ = ["Event", "Gaussian", "Laplace", "NonPrivate", "PoissonSampled", "Composed", "event_from_dict", "releases_without_noise"]


class Event:
    """Base class of all mechanism descriptions."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden by every event
        raise NotImplementedError


@dataclass(frozen=True)
class Gaussian(Event):
    """Gaussian mechanism with noise std ``noise_multiplier`` × L2 sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier("noise_multiplier", self.noise_multiplier))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "gaussian", "noise_multiplier": self.noise_multiplier}

    def __str__(self) -> str:
        return f"Gaussian(σ={self.noise_multiplier:.6g})"


@dataclass(frozen=True)
class Laplace(Event):
    """Laplace mechanism with per-coordinate scale ``noise_multiplier`` × L1 sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier("noise_multiplier", self.noise_multiplier))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "laplace", "noise_multiplier": self.noise_multiplier}

    def __str__(self) -> str:
        return f"Laplace(b={self.noise_multiplier:.6g})"


@dataclass(frozen=True)
class NonPrivate(Event):
    """A release without noise (e.g. DP-SGD with noise multiplier 0): no finite ε holds at any δ < 1.

    Even Poisson-sampled, the exact clipped gradient of an included example is released with probability q, so
    every accountant reports ε = ∞ for any history that contains it (conservative for δ ≥ q, exact below).
    """

    def to_dict(self) -> dict[str, Any]:
        return {"type": "non_private"}

    def __str__(self) -> str:
        return "NonPrivate(no noise)"


@dataclass(frozen=True)
class PoissonSampled(Event):
    """``mechanism`` applied to a Poisson sample: every record is included independently with prob. q."""

    sample_rate: float
    mechanism: Event

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        if not isinstance(self.mechanism, Event):
            raise PrivacyParameterError(
                f"mechanism must be an accountants event (Gaussian, Laplace, Composed, ...), got {self.mechanism!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"type": "poisson_sampled", "sample_rate": self.sample_rate, "mechanism": self.mechanism.to_dict()}

    def __str__(self) -> str:
        return f"PoissonSampled(q={self.sample_rate:.6g}, {self.mechanism})"


@dataclass(frozen=True)
class Composed(Event):
    """The listed mechanisms run on the same data (adaptively), the whole list repeated ``count`` times."""

    events: tuple[Event, ...]
    count: int = 1

    def __init__(self, events: Iterable[Event], count: int = 1) -> None:
        if isinstance(events, Event) or not isinstance(events, Iterable):
            raise PrivacyParameterError(
                f"Composed takes a list of events, got {events!r}: write Composed([event, ...], count), or use the "
                "event itself for one mechanism"
            )
        events = tuple(events)
        if not events:
            raise PrivacyParameterError("Composed needs at least one event, got an empty list")
        for event in events:
            if not isinstance(event, Event):
                raise PrivacyParameterError(f"Composed accepts only accountants events, got {event!r}")
        count = check_count("count", count, maximum=MAX_STEPS)
        if count * sum(_runs(e) for e in events) > MAX_STEPS:
            raise PrivacyParameterError(
                f"Composed must run at most {MAX_STEPS:,} mechanisms in all (count × nested runs), "
                f"got {count} × {sum(_runs(e) for e in events)}"
            )
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "count", count)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "composed", "events": [e.to_dict() for e in self.events], "count": self.count}

    def __str__(self) -> str:
        inner = " + ".join(str(e) for e in self.events)
        return f"[{inner}]" if self.count == 1 else f"{self.count} × [{inner}]"


def _runs(event: Event) -> int:
    """Number of noise releases in one run of ``event`` (a Composed counts its repeats)."""
    if isinstance(event, Composed):
        return event.count * sum(_runs(e) for e in event.events)
    if isinstance(event, PoissonSampled):
        return _runs(event.mechanism)
    return 1


def releases_without_noise(event: Event) -> bool:
    """Whether ``event`` contains a :class:`NonPrivate` release (then its ε is ∞)."""
    if isinstance(event, NonPrivate):
        return True
    if isinstance(event, PoissonSampled):
        return releases_without_noise(event.mechanism)
    if isinstance(event, Composed):
        return any(releases_without_noise(e) for e in event.events)
    return False


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from :meth:`Event.to_dict` output (validating every field)."""
    if not isinstance(data, Mapping) or "type" not in data:
        raise PrivacyParameterError(f"not an event description (a mapping with a 'type' key): {data!r}")
    kind = data["type"]
    try:
        if kind == "gaussian":
            return Gaussian(data["noise_multiplier"])
        if kind == "laplace":
            return Laplace(data["noise_multiplier"])
        if kind == "non_private":
            return NonPrivate()
        if kind == "poisson_sampled":
            return PoissonSampled(data["sample_rate"], event_from_dict(data["mechanism"]))
        if kind == "composed":
            return Composed([event_from_dict(e) for e in data["events"]], data["count"])
    except KeyError as missing:
        raise PrivacyParameterError(f"event of type {kind!r} lacks the field {missing}") from None
    raise PrivacyParameterError(
        f"unknown event type {kind!r}; expected gaussian, laplace, non_private, poisson_sampled or composed"
    )
