"""The PLD accountant: the same interface as :class:`~accountants.RDPAccountant`, a tight (ε, δ)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from . import pld
from ._validation import PrivacyParameterError, check_count, check_delta, check_nonnegative, check_positive
from .events import Composed, Event, Gaussian, Laplace, PoissonSampled, event_from_dict
from .rdp import _effective_gaussian, _normalise
from .rdp_accountant import HistoryEntry, _merged

__all__ = ["PLDAccountant", "UnsupportedEventError", "mechanisms_of"]

_STATE_FORMAT = "dpclip.accountants.PLDAccountant"
_STATE_VERSION = 1
DEFAULT_POINTS_PER_STD = 128.0


class UnsupportedEventError(PrivacyParameterError):
    """The PLD accountant cannot interpret this event (the RDP accountant may: it has general bounds)."""


def _unsupported(event: Event, why: str) -> UnsupportedEventError:
    return UnsupportedEventError(
        f"PLDAccountant cannot interpret {event}: {why}. It supports Gaussian, Laplace, compositions of them, "
        "and PoissonSampled(q, m) where m is a Gaussian, a Laplace, or a Composed of Gaussians with at most one "
        "Laplace; use RDPAccountant for other events"
    )


def _sampled_law(base: Event, whole: Event) -> pld._Law:
    """Noise law of ``base`` run once on a Poisson sample (all its releases see the same sample)."""
    if isinstance(base, Gaussian):
        return pld.GaussianLaw(base.noise_multiplier)
    if isinstance(base, Laplace):
        return pld.LaplaceLaw(base.noise_multiplier)
    if isinstance(base, Composed):
        sigma = _effective_gaussian(base)
        if sigma is not None:  # Gaussians on one sample are one Gaussian (Mironov 2017, Prop. 7; rdp.py)
            return pld.GaussianLaw(sigma)
        inverse_sq = 0.0
        laplaces: list[float] = []

        def walk(event: Event, multiplicity: int) -> None:
            nonlocal inverse_sq
            if isinstance(event, Gaussian):
                inverse_sq += multiplicity / event.noise_multiplier**2
            elif isinstance(event, Laplace):
                laplaces.extend([event.noise_multiplier] * multiplicity)
            elif isinstance(event, Composed):
                for inner in event.events:
                    walk(inner, multiplicity * event.count)
            else:
                raise _unsupported(whole, f"{event} inside a Poisson-sampled composition")

        walk(base, 1)
        if len(laplaces) != 1:
            raise _unsupported(whole, f"{len(laplaces)} Laplace releases on the same Poisson sample")
        if inverse_sq == 0.0:
            return pld.LaplaceLaw(laplaces[0])
        return pld.LaplaceGaussianLaw(laplaces[0], inverse_sq**-0.5)
    raise _unsupported(whole, f"{base} under Poisson sampling")


def mechanisms_of(event: Event) -> Counter:
    """The independent mechanism runs of one ``event``, as a Counter {pld.Mechanism: runs}.

    Raises :class:`UnsupportedEventError` for events the PLD accountant cannot interpret.
    """
    if not isinstance(event, Event):
        raise PrivacyParameterError(
            f"event must be an accountants event such as PoissonSampled(q, Gaussian(sigma)), got {event!r}"
        )
    runs: Counter = Counter()

    def walk(e: Event, multiplicity: int) -> None:
        if isinstance(e, PoissonSampled):
            runs[pld.Mechanism(_sampled_law(e.mechanism, event), e.sample_rate)] += multiplicity
        elif isinstance(e, Gaussian):
            runs[pld.Mechanism(pld.GaussianLaw(e.noise_multiplier))] += multiplicity
        elif isinstance(e, Laplace):
            runs[pld.Mechanism(pld.LaplaceLaw(e.noise_multiplier))] += multiplicity
        elif isinstance(e, Composed):
            for inner in e.events:
                walk(inner, multiplicity * e.count)
        else:
            raise _unsupported(event, f"unknown event type {type(e).__name__}")

    walk(_normalise(event), 1)
    return runs


def _total_runs(history: Sequence[HistoryEntry]) -> tuple[tuple[pld.Mechanism, int], ...]:
    """All mechanism runs of a history, merged; unsampled Gaussians become one exact Gaussian.

    k Gaussian mechanisms with μ_i = 1/σ_i compose to one with μ² = Σ μ_i² (Dong, Roth & Su 2022, Cor. 3.3).
    """
    total: Counter = Counter()
    for entry in history:
        for mech, runs in mechanisms_of(entry.event).items():
            total[mech] += runs * entry.count
    inverse_sq = 0.0
    for mech in [m for m in total if m.q == 1.0 and isinstance(m.law, pld.GaussianLaw)]:
        inverse_sq += total.pop(mech) / mech.law.sigma**2
    if inverse_sq > 0:
        total[pld.Mechanism(pld.GaussianLaw(inverse_sq**-0.5))] += 1
    return tuple(sorted(total.items(), key=lambda item: repr(item[0])))


class PLDAccountant:
    """Tracks privacy spent through privacy loss distributions: a near-exact, never optimistic (ε, δ).

    Each mechanism's privacy loss distribution is discretised pessimistically ("connect the dots",
    Doroshenko et al. 2022), composed by FFT (Koskela, Jälkö & Honkela 2020) and queried for ε; of the add
    and remove directions of add/remove-one adjacency the worse is reported (both are bounded on a coarse
    grid first, and the other is computed finely too unless its coarse bound already lies below).

    >>> from accountants import PLDAccountant, PoissonSampled, Gaussian
    >>> acc = PLDAccountant()
    >>> acc.compose(PoissonSampled(0.01, Gaussian(1.0)), count=10_000)
    >>> round(acc.get_epsilon(1e-5), 2)
    6.19

    ``value_discretization_interval`` fixes the grid step of the privacy loss (as in dp_accounting);
    by default (None) every distribution gets a power-of-two step ≈ its standard deviation /
    ``points_per_std``, re-chosen as composition spreads the loss, which keeps arrays short and ε accurate
    to ~1e-4 relative. :meth:`get_epsilon_and_error` also returns a rigorous bound on the numerical error.
    """

    def __init__(
        self,
        value_discretization_interval: float | None = None,
        points_per_std: float = DEFAULT_POINTS_PER_STD,
    ) -> None:
        step = None if value_discretization_interval is None else check_positive(
            "value_discretization_interval", value_discretization_interval
        )
        self._grid = pld.Grid(step=step, points_per_std=check_positive("points_per_std", points_per_std))
        self._history: list[HistoryEntry] = []
        self._cache: dict[tuple, pld.DiscretePLD] = {}

    # -- composition ---------------------------------------------------------------------------
    def compose(self, event: Event, count: int = 1) -> None:
        """Record ``count`` runs of ``event`` (count = 0 records nothing); unsupported events raise at once."""
        mechanisms_of(event)  # validate before changing anything
        count = check_count("count", count, minimum=0)
        self._history = _merged(self._history, event, count)

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

    @property
    def value_discretization_interval(self) -> float | None:
        """The fixed grid step, or None for automatic grids."""
        return self._grid.step

    @property
    def points_per_std(self) -> float:
        return self._grid.points_per_std

    # -- privacy queries -----------------------------------------------------------------------
    def _pld(self, runs: tuple, direction: str, grid: pld.Grid) -> pld.DiscretePLD:
        """The composed PLD of ``runs`` in one direction ('remove' or 'add') on ``grid`` (memoised)."""
        key = (runs, direction, grid)
        if key not in self._cache:
            total: pld.DiscretePLD | None = None
            for mech, count in runs:
                part = pld.fold(mech, direction, grid, count)
                total = part if total is None else pld.compose(total, part, grid)
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = total if total is not None else pld.DiscretePLD.identity(1.0)
        return self._cache[key]

    def _worst(self, history: Sequence[HistoryEntry], value) -> tuple[float, list[pld.DiscretePLD]]:
        """max over the add and remove directions of ``value(pld)`` (ε at δ, or δ at ε; larger is worse).

        Both directions are first bounded on a grid 8× coarser (cheap, and still an upper bound); only the
        worse is computed finely, and the other too unless its coarse bound is already below that value.
        Returns the value and the finely computed PLDs.
        """
        runs = _total_runs(history)
        if not any(mech.q < 1.0 for mech, _ in runs):  # symmetric noise: add and remove coincide
            fine = self._pld(runs, "remove", self._grid)
            return value(fine), [fine]
        if self._grid.step is not None:
            fines = [self._pld(runs, d, self._grid) for d in ("remove", "add")]
            return max(value(p) for p in fines), fines
        coarse_grid = pld.Grid(points_per_std=self._grid.points_per_std / 8)
        coarse = {d: value(self._pld(runs, d, coarse_grid)) for d in ("remove", "add")}
        first = max(coarse, key=coarse.get)
        other = "add" if first == "remove" else "remove"
        fines = [self._pld(runs, first, self._grid)]
        worst = value(fines[0])
        if coarse[other] > worst:
            fines.append(self._pld(runs, other, self._grid))
            worst = max(worst, value(fines[1]))
        return worst, fines

    def _epsilon(self, history: Sequence[HistoryEntry], delta: float) -> float:
        return self._worst(history, lambda p: p.epsilon_for_delta(delta))[0]

    def get_epsilon(self, delta: float) -> float:
        """Smallest ε such that everything composed so far is (ε, δ)-DP (an upper bound, never optimistic)."""
        return self._epsilon(self._history, check_delta(delta))

    def get_epsilon_and_error(self, delta: float) -> tuple[float, float]:
        """(ε, error): ε as :meth:`get_epsilon`, and a rigorous bound on how far it may exceed the exact ε.

        The exact ε of the mechanisms lies in [ε − error, ε]. The bound comes from coupling each
        discretisation step with the exact loss (Azuma–Hoeffding; see :mod:`accountants.pld`) and is
        conservative: the actual gap is typically ~100× smaller.
        """
        delta = check_delta(delta)
        upper, fines = self._worst(self._history, lambda p: p.epsilon_for_delta(delta))
        if math.isinf(upper):
            return math.inf, math.inf
        lower = max(p.epsilon_lower_bound(delta) for p in fines)
        return upper, max(upper - lower, 0.0)

    def get_epsilon_after(self, event: Event, delta: float, count: int = 1) -> float:
        """ε the history would have after ``count`` more runs of ``event``; the accountant is not changed."""
        mechanisms_of(event)
        count = check_count("count", count, minimum=0)
        return self._epsilon(_merged(self._history, event, count), check_delta(delta))

    def get_delta(self, epsilon: float) -> float:
        """Smallest δ such that everything composed so far is (ε, δ)-DP (an upper bound)."""
        epsilon = check_nonnegative("epsilon", epsilon)
        return self._worst(self._history, lambda p: p.delta_for_epsilon(epsilon))[0]

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; :meth:`load_state_dict` restores it exactly."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "value_discretization_interval": self._grid.step,
            "points_per_std": self._grid.points_per_std,
            "history": [{"event": e.event.to_dict(), "count": e.count} for e in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot from :meth:`state_dict`. On any error the accountant is left unchanged."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise PrivacyParameterError(
                f"not a PLDAccountant state (expected format {_STATE_FORMAT!r}); was it saved by another accountant?"
            )
        if state.get("version") != _STATE_VERSION:
            raise PrivacyParameterError(
                f"unsupported PLDAccountant state version {state.get('version')!r} (this dpclip reads {_STATE_VERSION})"
            )
        try:
            step = state["value_discretization_interval"]
            grid = pld.Grid(
                step=None if step is None else check_positive("value_discretization_interval", step),
                points_per_std=check_positive("points_per_std", state["points_per_std"]),
            )
            history: list[HistoryEntry] = []
            for item in state["history"]:
                event = event_from_dict(item["event"])
                mechanisms_of(event)
                history = _merged(history, event, check_count("count", item["count"]))
        except (KeyError, TypeError) as error:
            raise PrivacyParameterError(f"corrupt PLDAccountant state: {error!r}") from None
        if grid != self._grid:
            self._cache = {}
        self._grid, self._history = grid, history

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "PLDAccountant":
        accountant = cls()
        accountant.load_state_dict(state)
        return accountant

    # -- display -------------------------------------------------------------------------------
    def summary(self, delta: float | None = None) -> str:
        """Readable history, one line per entry, plus ε (and its numerical error bound) at ``delta`` if given."""
        lines = [f"PLDAccountant: {self.steps} composed events"]
        lines += [f"  {entry}" for entry in self._history]
        if delta is not None:
            eps, error = self.get_epsilon_and_error(delta)
            lines.append(f"  => (ε = {eps:.4g}, δ = {delta:g}), exact ε ≥ ε − {error:.2g} (numerical error bound)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PLDAccountant(steps={self.steps}, entries={len(self._history)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PLDAccountant):
            return NotImplemented
        return self._grid == other._grid and self._history == other._history

    __hash__ = None  # type: ignore[assignment]
