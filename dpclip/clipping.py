"""Steps 2–3 of the data path: clip each example's gradient to norm ≤ C (L2 or L1), then sum.

The bound C comes from a strategy: :class:`FixedClipping` or :class:`MedianClipping`
(Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping", Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from accountants.checks import check_positive, check_sample_rate

from .errors import EngineUsageError
from .norms import clip_norm

Tensor = torch.Tensor
Norm = Literal["l2", "l1"]

# Clip a hair below C so float rounding of factor·norm can never exceed C.
_SAFETY = 1.0 - 2.0**-20


def check_norm(norm: str) -> Norm:
    """``norm`` if it is "l2" or "l1" (see :mod:`dpclip.norms`), else a clear PrivacyParameterError."""
    return clip_norm(norm).name


def layer_norms(grads: Mapping[str, Tensor], norm: Norm = "l2") -> Tensor:
    """Per-example norm of each parameter's gradient: shape [batch, number of parameters], in float64."""
    return torch.stack([clip_norm(norm).vector(g).double() for g in grads.values()], dim=1)


def per_example_norms(grads: Mapping[str, Tensor], norm: Norm = "l2") -> Tensor:
    """Norm of each example's whole gradient (all parameters together): shape [batch]."""
    return clip_norm(norm).combine(layer_norms(grads, norm))


def clip_factors(norms: Tensor, max_norm: float | Tensor) -> Tensor:
    """min(1, C / norm) per example (1 for a zero gradient), so that factor × norm ≤ C (C may be one bound per
    column of ``norms``)."""
    return torch.clamp(max_norm * _SAFETY / norms, max=1.0)


def clipping_factors(grads: Mapping[str, Tensor], max_norm: float, norm: Norm = "l2", per_layer: bool = False) -> Tensor:
    """Factors [batch, layers] that clip each example's gradient (or each of its layers) to the bound."""
    if per_layer:
        return clip_factors(layer_norms(grads, norm), clip_norm(norm).part_bound(max_norm, len(grads)))
    return clip_factors(per_example_norms(grads, norm), max_norm)[:, None].expand(-1, len(grads))


def clip(grads: Mapping[str, Tensor], max_norm: float, norm: Norm = "l2", per_layer: bool = False) -> dict[str, Tensor]:
    """Per-example gradients scaled so that each example's norm is ≤ max_norm."""
    factors = clipping_factors(grads, max_norm, norm, per_layer)
    return {
        name: g * factors[:, i].to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))) for i, (name, g) in enumerate(grads.items())
    }


def clipped_sum(
    grads: Mapping[str, Tensor], max_norm: float, norm: Norm = "l2", per_layer: bool = False
) -> dict[str, Tensor]:
    """Σ_i clip(g_i): the aggregate whose sensitivity to adding/removing one example is max_norm."""
    factors = clipping_factors(grads, max_norm, norm, per_layer)
    return {
        name: torch.tensordot(factors[:, i].to(g.dtype), g, dims=([0], [0])) for i, (name, g) in enumerate(grads.items())
    }


def check_bound(policy: ClippingPolicy | None, bound: float | None) -> None:
    """Refuse a clipping bound C changed behind the engine's back (clipping and noise must use the same C)."""
    assert policy is not None
    if policy.max_norm != bound:
        raise EngineUsageError(
            f"max_grad_norm (the clipping bound C) was changed from {bound!r} to {policy.max_norm!r} outside the "
            "engine: the noise, the privacy report and checkpoints must all use the C that clipped the batch. C is "
            "fixed by make_private (clipping='median' adapts it privately); to train with another C, start a new "
            "PrivacyEngine."
        )


class ClippingPolicy(Protocol):
    """Where the clipping bound C comes from. The engine calls ``observe`` with each batch's per-example norms
    (it returns that batch's share of the statistic the policy releases, 0 when it releases none) and, after
    the step's release, ``after_release`` with the noisy statistic (None when the policy is not ``adaptive``)."""

    max_norm: float

    @property
    def adaptive(self) -> bool:
        """Whether C adapts to the data, through a noisy statistic released (and charged) every step."""
        ...

    @property
    def history(self) -> list[float]: ...

    def observe(self, norms: Tensor) -> float: ...

    def after_release(self, noisy_statistic: float | None, expected_batch_size: float) -> float: ...

    def restore(self, max_norm: float, history: list[float]) -> None: ...


@dataclass
class FixedClipping:
    """A constant clipping bound C; it releases nothing besides the gradient."""

    max_norm: float
    steps: int = 0

    def __post_init__(self) -> None:
        self.max_norm = check_positive("max_grad_norm", self.max_norm)

    @property
    def adaptive(self) -> bool:
        return False

    @property
    def history(self) -> list[float]:
        """C before each step and after the last (all equal)."""
        return [self.max_norm] * (self.steps + 1)

    def observe(self, norms: Tensor) -> float:
        return 0.0

    def after_release(self, noisy_statistic: float | None, expected_batch_size: float) -> float:
        self.steps += 1
        return self.max_norm

    def restore(self, max_norm: float, history: list[float]) -> None:
        self.max_norm, self.steps = max_norm, len(history) - 1


@dataclass
class MedianClipping:
    """Adaptive C tracking a quantile γ of the gradient norms (Andrew et al. 2021, Alg. 1).

    Each step releases b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / (qN) + ½ with b_i = [‖g_i‖ ≤ C]; the centred count has
    add/remove sensitivity ½, i.e. it is a Gaussian mechanism with noise multiplier 2σ_b (Andrew et al. §3.1).
    Then C ← C · exp(−η (b̃ − γ)).
    """

    max_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float = 1.0
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.max_norm = check_positive("max_grad_norm", self.max_norm)
        self.target_quantile = check_sample_rate(self.target_quantile, "target_quantile")
        self.learning_rate = check_positive("clip_learning_rate", self.learning_rate)
        self.count_noise_multiplier = check_positive("count_noise_multiplier", self.count_noise_multiplier)
        if not self.history:
            self.history = [self.max_norm]

    @property
    def adaptive(self) -> bool:
        return True

    def centred_count(self, norms: Tensor) -> Tensor:
        """Σ_i (b_i − ½) for the examples of a batch (before noise; NaN norms count as above C)."""
        return ((norms <= self.max_norm).to(torch.float64) - 0.5).sum()

    def observe(self, norms: Tensor) -> float:
        return float(self.centred_count(norms))

    def after_release(self, noisy_statistic: float | None, expected_batch_size: float) -> float:
        assert noisy_statistic is not None
        return self.update(noisy_statistic, expected_batch_size)

    def restore(self, max_norm: float, history: list[float]) -> None:
        self.max_norm, self.history = max_norm, list(history)

    def update(self, noisy_centred_count: float, expected_batch_size: float) -> float:
        """Apply the geometric update from the released (noisy) count; returns the new C."""
        fraction_below = noisy_centred_count / expected_batch_size + 0.5
        self.max_norm *= math.exp(-self.learning_rate * (fraction_below - self.target_quantile))
        self.history.append(self.max_norm)
        return self.max_norm
