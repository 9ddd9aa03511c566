"""What an engine tells about its privacy: a JSON-ready report with a plain-language statement."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from accountants import privacy_statement

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
            accountant=engine.accountant_name.upper(),
            extra=extra,
        ),
    }


def check_budget(engine: PrivacyEngine) -> None:
    """Raise :class:`PrivacyBudgetExceeded` if one more step would take ε past the engine's budget."""
    if engine.budget is None:
        return
    target, delta = engine.budget
    after = engine.accountant.get_epsilon_after(engine._step_event, delta)
    if after > target:
        raise PrivacyBudgetExceeded(
            f"one more step would bring epsilon to {after:.4f} > target {target:g} (delta={delta:g}) with the "
            f"{engine.accountant_name.upper()} accountant; {engine.steps} steps taken so far, epsilon = "
            f"{engine.accountant.get_epsilon(delta):.4f}. Stop training here, or plan more steps with "
            "make_private_with_epsilon(..., epochs=...)."
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
        """A tqdm bar over ``iterable`` showing ε spent (and whatever you pass to ``.log(loss=...)``)."""
        return PrivacyProgress(iterable, lambda: self.get_epsilon(delta), lambda: self.steps, **tqdm_kwargs)
