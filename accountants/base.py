"""The accountant interface shared by :class:`~accountants.RDPAccountant` and :class:`~accountants.PLDAccountant`.

:class:`Accountant` owns everything that does not depend on how privacy is measured: the history of composed
events (check-then-commit), persistence, display and equality. A subclass supplies the measurement
(:meth:`Accountant._epsilon_result`, :meth:`Accountant._delta`), its settings and, if it cannot interpret
every event, a stricter :meth:`Accountant._check_event`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .checks import MAX_STEPS, check_count, check_delta, check_nonnegative
from .errors import PrivacyParameterError
from .events import Event, event_from_dict, releases_without_noise
from .statement import format_delta, format_epsilon

__all__ = ["Accountant", "EpsilonResult", "HistoryEntry"]

_A = TypeVar("_A", bound="Accountant")


@dataclass(frozen=True)
class EpsilonResult:
    """An (ε, δ) guarantee's ε, with what the accountant knows about it.

    ``order``: the Rényi order α whose bound gave ε (RDP; ``math.inf`` for a pure-DP composition), else None.
    ``error``: a rigorous bound on how far ε may exceed the exact ε of the mechanisms (PLD), else None.
    """

    epsilon: float
    order: float | None = None
    error: float | None = None


@dataclass(frozen=True)
class HistoryEntry:
    """``event`` composed ``count`` times in a row."""

    event: Event
    count: int

    def __str__(self) -> str:
        return f"{self.count} × {self.event}"


def merged(history: Sequence[HistoryEntry], event: Event, count: int) -> list[HistoryEntry]:
    """The history with ``count`` more runs of ``event``, merged into the last entry when it is the same."""
    entries = list(history)
    if entries and entries[-1].event == event:
        entries[-1] = HistoryEntry(event, entries[-1].count + count)
    elif count > 0:
        entries.append(HistoryEntry(event, count))
    return entries


def _article(name: str) -> str:
    return "an" if name[:1] in "AEFHILMNORSX" else "a"  # letters read with a leading vowel sound


class Accountant(ABC):
    """A history of mechanism runs and the (ε, δ) it implies; subclasses say how privacy is measured.

    Composition is check-then-commit: :meth:`compose` and :meth:`load_state_dict` validate everything before
    changing anything, so an error leaves the accountant as it was.
    """

    #: Tag of :meth:`state_dict` snapshots (a snapshot of another accountant is refused).
    state_format: ClassVar[str]
    state_version: ClassVar[int] = 1

    def __init__(self) -> None:
        self._history: list[HistoryEntry] = []

    # -- what a subclass supplies ----------------------------------------------------------------
    def _check_event(self, event: object) -> Event:
        """Return ``event`` if this accountant can interpret it, else raise PrivacyParameterError.

        Called only for events without a :class:`~accountants.events.NonPrivate` part (those need no measurement).
        """
        if not isinstance(event, Event):
            raise PrivacyParameterError(
                f"event must be an accountants event such as PoissonSampled(q, Gaussian(sigma)), got {event!r}"
            )
        return event

    @abstractmethod
    def _epsilon_result(self, history: Sequence[HistoryEntry], delta: float) -> EpsilonResult:
        """ε at a validated ``delta`` for ``history`` (which need not be the accountant's own)."""

    @abstractmethod
    def _delta(self, history: Sequence[HistoryEntry], epsilon: float) -> float:
        """δ at a validated ``epsilon`` for ``history``."""

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """The accountant's JSON-serialisable settings (stored in :meth:`state_dict`, compared by ``==``)."""

    @abstractmethod
    def _parse_settings(self, state: Mapping[str, Any]) -> Any:
        """Validated settings read from a snapshot, not yet applied (raises on bad values)."""

    @abstractmethod
    def _apply_settings(self, settings: Any) -> None:
        """Apply what :meth:`_parse_settings` returned (must not fail)."""

    # -- composition ---------------------------------------------------------------------------
    def _accept(self, event: object) -> Event:
        """``event`` if it is an event this accountant can record: one it can measure, or one with no noise."""
        if isinstance(event, Event) and releases_without_noise(event):
            return event
        return self._check_event(event)

    @staticmethod
    def _without_noise(history: Sequence[HistoryEntry]) -> bool:
        """Whether ``history`` released anything without noise (no finite ε, δ(ε) = 1)."""
        return any(releases_without_noise(entry.event) for entry in history)

    def _measure(self, history: Sequence[HistoryEntry], delta: float) -> EpsilonResult:
        """ε of ``history`` at ``delta``: ∞ if anything was released without noise, else the subclass's bound."""
        if self._without_noise(history):
            return EpsilonResult(math.inf)
        return self._epsilon_result(history, delta)

    def compose(self, event: Event, count: int = 1) -> None:
        """Record ``count`` runs of ``event`` (count = 0 records nothing); on any error nothing changes."""
        event = self._accept(event)
        count = self._check_more_steps(count)
        self._history = merged(self._history, event, count)

    def _check_more_steps(self, count: object) -> int:
        """``count`` as an int if ≥ 0 and the history stays within :data:`~accountants.checks.MAX_STEPS` steps."""
        count = check_count("count", count, minimum=0, maximum=MAX_STEPS)
        if self.steps + count > MAX_STEPS:
            raise PrivacyParameterError(
                f"count={count} would bring the history to {self.steps + count} steps; an accountant composes "
                f"at most {MAX_STEPS:,} steps"
            )
        return count

    def reset(self) -> None:
        """Forget the whole history (a fresh budget)."""
        self._history = []

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """What was composed, in order, consecutive repeats merged."""
        return tuple(self._history)

    @property
    def steps(self) -> int:
        """Total number of composed events."""
        return sum(entry.count for entry in self._history)

    # -- privacy queries -----------------------------------------------------------------------
    def epsilon_result(self, delta: float) -> EpsilonResult:
        """Smallest certified ε with (ε, δ)-DP for the whole history, with its Rényi order or error bound."""
        return self._measure(self._history, check_delta(delta))

    def get_epsilon(self, delta: float) -> float:
        """Smallest ε such that everything composed so far is (ε, δ)-DP (an upper bound, never optimistic)."""
        return self.epsilon_result(delta).epsilon

    def get_epsilon_after(self, event: Event, delta: float, count: int = 1) -> float:
        """ε the history would have after ``count`` more runs of ``event``; the accountant is not changed."""
        event = self._accept(event)
        count = self._check_more_steps(count)
        return self._measure(merged(self._history, event, count), check_delta(delta)).epsilon

    def get_delta(self, epsilon: float) -> float:
        """Smallest δ such that everything composed so far is (ε, δ)-DP (an upper bound)."""
        epsilon = check_nonnegative("epsilon", epsilon)
        if self._without_noise(self._history):
            return 1.0
        return self._delta(self._history, epsilon)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; :meth:`load_state_dict` restores it exactly."""
        return {
            "format": self.state_format,
            "version": self.state_version,
            **self._settings(),
            "history": [{"event": e.event.to_dict(), "count": e.count} for e in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot from :meth:`state_dict`. On any error the accountant is left unchanged."""
        name = type(self).__name__
        if not isinstance(state, Mapping) or state.get("format") != self.state_format:
            raise PrivacyParameterError(
                f"not {_article(name)} {name} state (expected format {self.state_format!r}); "
                "was it saved by another accountant?"
            )
        if state.get("version") != self.state_version:
            raise PrivacyParameterError(
                f"unsupported {name} state version {state.get('version')!r} (this dpclip reads {self.state_version})"
            )
        try:
            settings = self._parse_settings(state)
            history: list[HistoryEntry] = []
            for item in state["history"]:
                event = self._accept(event_from_dict(item["event"]))
                history = merged(history, event, check_count("count", item["count"], maximum=MAX_STEPS))
            if sum(entry.count for entry in history) > MAX_STEPS:
                raise PrivacyParameterError(f"{name} state holds more than {MAX_STEPS:,} steps")
        except (KeyError, TypeError) as error:
            raise PrivacyParameterError(f"corrupt {name} state: {error!r}") from None
        except RecursionError:  # events nested thousands deep: no accountant writes such a state
            raise PrivacyParameterError(f"corrupt {name} state: its events are nested too deeply to read") from None
        self._apply_settings(settings)
        self._history = history

    @classmethod
    def from_state_dict(cls: type[_A], state: Mapping[str, Any]) -> _A:
        """A new accountant restored from :meth:`state_dict` output."""
        accountant = cls()
        accountant.load_state_dict(state)
        return accountant

    # -- display -------------------------------------------------------------------------------
    def summary(self, delta: float | None = None) -> str:
        """Readable history, one line per entry, plus ε (with its order or error bound) at ``delta`` if given."""
        lines = [f"{type(self).__name__}: {self.steps} composed events"]
        lines += [f"  {entry}" for entry in self._history]
        if delta is not None:
            result = self.epsilon_result(delta)
            line = f"  => (ε = {format_epsilon(result.epsilon)}, δ = {format_delta(delta, 6)})"
            if result.order is not None:
                line += f" at order α = {result.order:g}"
            if result.error is not None:
                line += f", exact ε ≥ ε − {result.error:.2g} (numerical error bound)"
            lines.append(line)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, entries={len(self._history)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Accountant)
        return self._settings() == other._settings() and self._history == other._history

    __hash__ = None  # type: ignore[assignment]
