"""What an engine tells about its privacy: a JSON-ready report with a plain-language statement."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from accountants import Accountant, Event, HistoryEntry, privacy_statement
from accountants.statement import accountant_label
from accountants.base import merged
from accountants.checks import MAX_STEPS

from .errors import PrivacyBudgetExceeded, PrivacyParameterError
from .progress import PrivacyProgress

if TYPE_CHECKING:
    from .engine import PrivacyEngine


def privacy_report(engine: PrivacyEngine, delta: float) -> dict[str, Any]:
    """ε, δ, σ, q, steps, clipping, mechanism, accountant, history and a statement, for ``engine`` at ``delta``."""
    settings = engine.settings
    assert settings is not None and engine.clipping is not None
    result = engine.accountant.epsilon_result(delta)
    order = None if result.order is None or math.isinf(result.order) else result.order
    extra = None
    if settings.clipping == "median":
        assert settings.count_noise_multiplier is not None
        extra = (
            f"Adaptive clipping (median tracking) releases a noisy count each step (noise multiplier "
            f"{2 * settings.count_noise_multiplier:.4g} on sensitivity 1); it is included in ε."
        )
    if settings.layer_bounds is not None:
        extra = (
            f"Per-layer clipping: each parameter's gradient is clipped to its own bound; the noise is calibrated to "
            f"their combined bound C = {engine.clipping.max_norm:.4g}."
        )
    if not engine.secure_mode:
        extra = (extra + " " if extra else "") + (
            "The noise and the batches come from seeded generators (PrivacyEngine(seed=...), noise_generator, or a "
            "seed drawn from the OS, which checkpoints keep): this ε assumes those seeds stay secret, since anyone "
            "who knows them can regenerate the noise (secure_mode=True draws every value from the OS)."
        )
    elif engine.seeded_steps:
        extra = (extra + " " if extra else "") + (
            f"{engine.seeded_steps} of the {engine.steps} steps come from a checkpoint of a run without secure_mode: "
            "their noise and batches came from seeded generators, and for them this ε assumes those seeds stay "
            "secret, since anyone who knows them can regenerate that noise."
        )
    if engine.nonfinite_refusals:
        extra = (extra + " " if extra else "") + (
            f"{engine.nonfinite_refusals} step(s) were refused for non-finite gradients: each refusal revealed, "
            "without noise, that its batch held an example with a NaN/inf gradient, which this ε does not cover "
            "(nonfinite='drop' keeps such examples inside the guarantee)."
        )
    return {
        "epsilon": result.epsilon,
        "delta": delta,
        "order": order,
        "epsilon_error": result.error,
        "accountant": engine.accountant_name,
        "mechanism": settings.mechanism,
        "norm": settings.norm,
        "noise_multiplier": settings.noise_multiplier,
        "gradient_noise_multiplier": settings.gradient_noise_multiplier,
        "count_noise_multiplier": settings.count_noise_multiplier,
        "sample_rate": settings.sample_rate,
        "dataset_size": settings.dataset_size,
        "expected_batch_size": settings.expected_batch_size,
        "steps": engine.steps,
        "clipping": settings.clipping,
        "max_grad_norm": engine.clipping.max_norm,
        "clip_history": engine.clip_history,
        "per_layer_clipping": settings.per_layer,
        "layer_bounds": None if settings.layer_bounds is None else dict(settings.layer_bounds),
        "non_private": settings.non_private,
        "nonfinite_refusals": engine.nonfinite_refusals,
        "seeded_steps": engine.seeded_steps,
        "budget": None if engine.budget is None else {"epsilon": engine.budget[0], "delta": engine.budget[1]},
        "history": [str(entry) for entry in engine.accountant.history],
        "statement": privacy_statement(
            result.epsilon,
            delta,
            steps=engine.steps,
            sample_rate=settings.sample_rate,
            noise_multiplier=settings.noise_multiplier,
            mechanism=settings.mechanism,
            order=result.order,
            accountant=accountant_label(engine.accountant_name, result.error),
            extra=extra,
        ),
    }


class BudgetGuard:
    """Refuses a step that would take ε past ``target`` at ``delta``, at the cost of a counter per step.

    The number of further steps that fit, k* = max{k : ε(history + k × event) ≤ target}, is searched once
    (doubling, then bisection: O(log k*) accountant queries) and recomputed only when the history is not the
    one it was computed for plus the engine's own steps (e.g. after loading a checkpoint). ε is nondecreasing
    in k for the exact privacy loss; every computed ε is an upper bound of it, so for any k ≤ k*,
    ε_exact(k) ≤ ε_exact(k*) ≤ ε_computed(k*) ≤ target even where rounding makes the computed curve locally
    non-monotone: every allowed step stays within the budget.
    """

    def __init__(self, target: float, delta: float) -> None:
        self.target, self.delta = target, delta
        self._base: tuple[HistoryEntry, ...] | None = None
        self._room = 0

    def steps_left(self, accountant: Accountant, event: Event) -> int:
        """How many more runs of ``event`` fit the budget after the accountant's current history."""
        history = accountant.history
        base_steps = None if self._base is None else sum(entry.count for entry in self._base)
        if base_steps is None or tuple(merged(self._base, event, accountant.steps - base_steps)) != history:  # type: ignore[arg-type]
            self._base, self._room, base_steps = history, self._search(accountant, event), accountant.steps
        return self._room - (accountant.steps - base_steps)

    def _search(self, accountant: Accountant, event: Event) -> int:
        def fits(k: int) -> bool:
            return accountant.get_epsilon_after(event, self.delta, k) <= self.target

        limit = MAX_STEPS - accountant.steps
        if limit < 1 or not fits(1):
            return 0
        low, high = 1, 2  # fits(low); high: not yet known
        while high <= limit and fits(high):
            low, high = high, 2 * high
        high = min(high, limit + 1)  # invariant: fits(low), not fits(high) (or high beyond the limit)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low


def check_budget(engine: PrivacyEngine) -> None:
    """Raise :class:`PrivacyBudgetExceeded` if one more step would take ε past the engine's budget."""
    if engine.budget is None:
        return
    target, delta = engine.budget
    if engine.budget_guard is None or (engine.budget_guard.target, engine.budget_guard.delta) != (target, delta):
        engine.budget_guard = BudgetGuard(target, delta)
    if engine.budget_guard.steps_left(engine.accountant, engine._step_event) >= 1:
        return
    after = engine.accountant.get_epsilon_after(engine._step_event, delta)
    other = "rdp" if engine.accountant_name == "pld" else "pld"
    raise PrivacyBudgetExceeded(
        f"one more step would bring epsilon to {after:.4f} > target {target:g} (delta={delta:g}) with the "
        f"{engine.accountant_name.upper()} accountant; {engine.steps} steps taken so far, epsilon = "
        f"{engine.accountant.get_epsilon(delta):.4f}. Stop training here, or plan more steps with "
        "make_private_with_epsilon(..., epochs=...), which calibrates σ with this same accountant. A plan made "
        f"elsewhere must use it too: dpclip-budget --accountant {engine.accountant_name} (PLD is the default of both "
        f"dpclip-budget and PrivacyEngine; PrivacyEngine(accountant={other!r}) selects {other.upper()}, "
        f"{'looser' if other == 'rdp' else 'tighter'})."
    )


class PrivacyReporting:
    """The engine's reporting methods: ε spent, the C trajectory, the privacy report and a progress bar."""

    def get_epsilon(self: Any, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the budget's δ)."""
        self._require_setup()
        return self.accountant.get_epsilon(self._delta(delta))

    def _delta(self: Any, delta: float | None) -> float:
        if delta is None:
            if self.budget is None:
                raise PrivacyParameterError("pass delta= (no target_delta was set)")
            return self.budget[1]
        return delta

    @property
    def clip_history(self: Any) -> list[float]:
        """The clipping bound C before each step and after the last (constant for fixed clipping)."""
        return [] if self.clipping is None else list(self.clipping.history)

    def privacy_report(self: Any, delta: float | None = None) -> dict[str, Any]:
        """A JSON-ready summary: ε, δ, σ, q, steps, clipping, mechanism, accountant and a plain statement."""
        self._require_setup()
        return privacy_report(self, self._delta(delta))

    def progress(self: Any, iterable: Iterable, delta: float | None = None, **tqdm_kwargs: Any) -> PrivacyProgress:
        """A tqdm bar over ``iterable`` showing ε spent (and whatever you pass to ``.log(loss=...)``). Over dpclip's
        Poisson loader it counts the epoch's logical batches handed out (micro-batches of one batch count once, and
        an epoch resumed from a checkpoint starts where it stands), out of ``len(loader)``."""
        from .sampling import PoissonDataLoader

        if isinstance(iterable, PoissonDataLoader):
            tqdm_kwargs.setdefault("done", lambda: iterable.steps_done_in_epoch)
        return PrivacyProgress(iterable, lambda: self.get_epsilon(delta), lambda: self.steps, **tqdm_kwargs)
