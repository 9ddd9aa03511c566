"""Steps 2–3 of the data path: clip each example's gradient to norm ≤ C (L2 or L1), then sum.

The bound C comes from a strategy: :class:`FixedClipping` or :class:`MedianClipping`
(Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping", Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from accountants._validation import PrivacyParameterError, check_positive, check_sample_rate

Tensor = torch.Tensor
Norm = Literal["l2", "l1"]

# Clip a hair below C so float rounding of factor·norm can never exceed C.
_SAFETY = 1.0 - 2.0**-20


def check_norm(norm: str) -> Norm:
    if norm not in ("l2", "l1"):
        raise PrivacyParameterError(
            f"norm must be 'l2' (clipping in L2, Gaussian noise) or 'l1' (clipping in L1, Laplace noise), got {norm!r}; "
            "the noise always matches the clipping norm, since only that pair is what the accountant charges"
        )
    return norm  # type: ignore[return-value]


def _flat(grad: Tensor) -> Tensor:
    return grad.reshape(grad.shape[0], -1)


def layer_norms(grads: Mapping[str, Tensor], norm: Norm = "l2") -> Tensor:
    """Per-example norm of each parameter's gradient: shape [batch, number of parameters]."""
    order = 2 if norm == "l2" else 1
    return torch.stack([torch.linalg.vector_norm(_flat(g).float(), ord=order, dim=1) for g in grads.values()], dim=1)


def per_example_norms(grads: Mapping[str, Tensor], norm: Norm = "l2") -> Tensor:
    """Norm of each example's whole gradient (all parameters together): shape [batch]."""
    per_layer = layer_norms(grads, norm)
    return per_layer.square().sum(dim=1).sqrt() if norm == "l2" else per_layer.sum(dim=1)


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """min(1, C / norm) per example (1 for a zero gradient), so that factor × norm ≤ C."""
    return torch.clamp(max_norm * _SAFETY / norms, max=1.0)


def layer_bound(max_norm: float, layers: int, norm: Norm) -> float:
    """Per-layer bound C_k with Σ C_k² = C² (L2) or Σ C_k = C (L1), so the whole gradient stays ≤ C."""
    return max_norm / math.sqrt(layers) if norm == "l2" else max_norm / layers


def clipping_factors(grads: Mapping[str, Tensor], max_norm: float, norm: Norm = "l2", per_layer: bool = False) -> Tensor:
    """Factors [batch, layers] that clip each example's gradient (or each of its layers) to the bound."""
    if per_layer:
        return clip_factors(layer_norms(grads, norm), layer_bound(max_norm, len(grads), norm))
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


@dataclass
class FixedClipping:
    """A constant clipping bound C."""

    max_norm: float

    def __post_init__(self) -> None:
        self.max_norm = check_positive("max_grad_norm", self.max_norm)

    @property
    def adaptive(self) -> bool:
        return False


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
        """Σ_i (b_i − ½) for the examples of a batch (before noise)."""
        return ((norms <= self.max_norm).to(torch.float64) - 0.5).sum()

    def update(self, noisy_centred_count: float, expected_batch_size: float) -> float:
        """Apply the geometric update from the released (noisy) count; returns the new C."""
        fraction_below = noisy_centred_count / expected_batch_size + 0.5
        self.max_norm *= math.exp(-self.learning_rate * (fraction_below - self.target_quantile))
        self.history.append(self.max_norm)
        return self.max_norm
